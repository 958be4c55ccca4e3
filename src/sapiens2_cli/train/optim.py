"""AdamW parameter groups with layer-wise LR decay, and the iteration-based LR schedule.

Parameter rules (training spec §1.2), on names with any DDP / FSDP / compile wrapper prefix
removed and the backbone under ``backbone.``:

* weight decay 0 for every tensor with ``ndim <= 1`` (norm weights, biases, LayerScale), every
  name ending in ``.bias`` and every name containing ``pos_embed``; the rest gets
  ``weight_decay`` (including the 3-D ``cls_token`` / ``storage_tokens``);
* depth ``d``: 0 for ``backbone.{cls_token, mask_token, pos_embed, storage_tokens}`` and
  anything under ``backbone.patch_embed`` / ``backbone.tokenizer``; ``i + 1`` under
  ``backbone.blocks.<i>`` (or ``backbone.layers.<i>``); ``L + 1`` for everything else (final
  norm, decode head). ``lr(p) = lr * r ** (L + 1 - d)``.

Schedule (§1.3), stepped once per optimizer step: linear warm-up of the factor from
``warmup_start_factor`` to 1 over ``warmup_iters`` steps, then linear (power-1 polynomial) or
cosine decay to ``final_lr / lr`` at ``iterations``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import torch

from sapiens2_cli.train.config import OptimConfig, ScheduleConfig

__all__ = ["build_optimizer", "build_scheduler", "layer_depth", "lr_factor", "param_groups"]

_WRAPPERS = re.compile(
    r"(^|\.)(_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod|module)\."
)
_EMBEDDINGS = ("cls_token", "mask_token", "pos_embed", "storage_tokens")
_BLOCK = re.compile(r"^(?:blocks|layers)\.(\d+)\.")


def clean_name(name: str) -> str:
    """Remove wrapper prefixes: ``module._orig_mod.backbone.x`` -> ``backbone.x``."""
    previous = None
    while previous != name:
        previous, name = name, _WRAPPERS.sub(r"\1", name)
    return name


def layer_depth(name: str, num_layers: int, *, backbone_prefix: str = "backbone.") -> int:
    """Depth index ``d`` of a parameter name (see module docstring), in ``[0, L + 1]``."""
    name = clean_name(name)
    if not name.startswith(backbone_prefix):
        return num_layers + 1
    local = name[len(backbone_prefix) :]
    first = local.split(".", 1)[0]
    if first in _EMBEDDINGS or first in ("patch_embed", "tokenizer"):
        return 0
    match = _BLOCK.match(local)
    if match:
        return int(match.group(1)) + 1
    return num_layers + 1


def _no_decay(name: str, param: torch.Tensor) -> bool:
    return param.ndim <= 1 or name.endswith(".bias") or "pos_embed" in name


def param_groups(
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
    *,
    lr: float,
    weight_decay: float,
    layer_decay: float | None,
    num_layers: int,
    backbone_prefix: str = "backbone.",
) -> list[dict]:
    """Group trainable parameters by (depth, decay) for ``torch.optim.AdamW``.

    Returns:
        a list of dicts with ``params``, ``names``, ``lr`` (already scaled), ``lr_scale``,
        ``weight_decay`` and ``depth``, ordered by depth then decay; frozen parameters
        (``requires_grad=False``) are left out.
    """
    groups: dict[tuple[int, bool], dict] = {}
    for raw_name, param in named_parameters:
        if not param.requires_grad:
            continue
        name = clean_name(raw_name)
        depth = layer_depth(name, num_layers, backbone_prefix=backbone_prefix)
        decay = not _no_decay(name, param)
        scale = 1.0 if layer_decay is None else layer_decay ** (num_layers + 1 - depth)
        group = groups.setdefault(
            (depth, decay),
            {
                "params": [],
                "names": [],
                "lr": lr * scale,
                "lr_scale": scale,
                "weight_decay": weight_decay if decay else 0.0,
                "depth": depth,
            },
        )
        group["params"].append(param)
        group["names"].append(name)
    return [groups[key] for key in sorted(groups)]


def build_optimizer(
    model: torch.nn.Module, cfg: OptimConfig, *, num_layers: int, fused: bool | None = None
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` of ``model``; ``fused`` None = on when all are CUDA."""
    groups = param_groups(
        model.named_parameters(),
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        layer_decay=cfg.layer_decay,
        num_layers=num_layers,
    )
    if fused is None:
        fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused)


def lr_factor(step: int, *, iterations: int, base_lr: float, cfg: ScheduleConfig) -> float:
    """Multiplier of every group's initial LR after ``step`` optimizer steps (0 = first step)."""
    if step < cfg.warmup_iters:
        start = cfg.warmup_start_factor
        return start + (1.0 - start) * step / cfg.warmup_iters
    final = cfg.final_lr / base_lr
    span = max(iterations - cfg.warmup_iters, 1)
    t = min(step - cfg.warmup_iters, span) / span
    shape = 1.0 - t if cfg.decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * t))
    return final + (1.0 - final) * shape


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, *, iterations: int, base_lr: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` applying :func:`lr_factor`; call ``scheduler.step()`` after each step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, iterations=iterations, base_lr=base_lr, cfg=cfg)
    )
