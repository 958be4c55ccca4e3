"""Student and EMA teacher: one ``step`` computes every pretraining loss term for a batch.

Who sees what (spec/training.md §5.1; the choices marked [I] there):

- the student encodes each **masked** global view once (visible cells only); that single pass
  feeds both the MAE decoder (reconstructing the masked cells) and the DINO head (its
  ``[cls]`` token), so the contrastive branch costs no extra global pass;
- the student encodes the local crops **unmasked** (they have no reconstruction target, and
  masking a 28x21-cell crop further would starve the class token);
- the teacher encodes the **unmasked** global views, without gradients;
- KoLeo acts on the student's global ``[cls]`` tokens (backbone output, before the head),
  per global view, averaged over the views.

The teacher (backbone + DINO head) starts as an exact copy of the student and follows it by
EMA after every optimizer step (``update_teacher``), and the DINO centre moves once per
optimizer step (``update_center``); its backbone is what pretraining releases
(``export_teacher`` / ``save_teacher``).

Under FSDP2 (``shard_units``) the teacher is sharded exactly like the student: each teacher
block and the teacher head is its own unit, placed like its student twin, so the EMA update is
a local, communication-free operation on matching shards, the teacher costs ``1/N`` of its
weights per rank, and its all-gathers happen only for its own forward pass (it has no backward
pass). The teacher's embeddings and final norm, like the student's, stay in the root unit.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from sapiens2_cli.models.backbone import Sapiens2Backbone
from sapiens2_cli.models.layers import LayerScale
from sapiens2_cli.models.sapiens2 import ModelInfo, Sapiens2Model
from sapiens2_cli.pretrain.heads import DINOHead, MAEDecoder, reconstruction_target
from sapiens2_cli.pretrain.losses import (
    DINOLoss,
    koleo_loss,
    norm_pix_loss,
    weighted_total,
)
from sapiens2_cli.pretrain.schedules import teacher_momentum, teacher_temperature
from sapiens2_cli.train.model_setup import run_arch

if TYPE_CHECKING:
    from sapiens2_cli.models.arch import BackboneArch
    from sapiens2_cli.train.config import Config

NO_DECAY_NAMES = ("cls_token", "storage_tokens", "mask_token", "pos_embed", "w_cls")


def init_weights(module: nn.Module, *, layer_scale: float = 1e-4) -> None:
    """From-scratch init: linear weights truncated-normal (std 0.02), biases 0, tokens N(0, 0.02).

    Convolutions keep PyTorch's default (fan-in uniform), norms 1, LayerScale ``layer_scale``.
    """
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, LayerScale):
            nn.init.constant_(m.weight, layer_scale)
    for name, p in module.named_parameters():
        if name.rsplit(".", 1)[-1] in ("cls_token", "storage_tokens", "w_cls", "local_pos_embed", "mask_token"):
            nn.init.normal_(p, std=0.02)


class PretrainModel(nn.Module):
    """``student`` (backbone, DINO head), ``decoder`` (MAE), ``teacher`` (EMA copy), ``dino_loss``.

    Built from a resolved ``task: pretrain`` configuration: the backbone of ``cfg.model``
    (``model_setup.run_arch``), the heads and weights of ``cfg.loss``, the schedules over
    ``cfg.train.iterations``. Randomly initialised from the global torch RNG (seed it first).

    Batch (from ``data.collate``): ``global_crops`` ``[B, G, 3, H, W]``, ``local_crops``
    ``[B, L, 3, h, w]`` (``L`` may be 0), ``keep`` ``[B, G, K]`` and ``masked`` ``[B, G, M]``
    (cell indices per global view, ``masking.Masks``). Images are ImageNet-normalised RGB.
    """

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.arch = run_arch(cfg.model)
        self.input_size = tuple(cfg.model.input_size)
        self.terms = cfg.loss
        self.iterations = cfg.train.iterations
        dim = self.arch.embed_dims
        mae, dino = cfg.loss.mae, cfg.loss.dino
        backbone = Sapiens2Backbone(self.arch)
        unit = self.arch.stride // mae.target_downsample
        self.student = nn.ModuleDict(
            {
                "backbone": backbone,
                "dino_head": DINOHead(
                    dim,
                    prototypes=dino.prototypes,
                    hidden_dims=dino.hidden_dims,
                    bottleneck_dims=dino.bottleneck_dims,
                ),
            }
        )
        self.decoder = MAEDecoder(
            dim,
            unit * unit * self.arch.in_channels,
            num_prefix=backbone.num_prefix,
            dims=mae.decoder_dims,
            layers=mae.decoder_layers,
            heads=mae.decoder_heads,
        )
        layer_scale = cfg.model.layer_scale_init
        init_weights(self.student, layer_scale=1e-4 if layer_scale is None else layer_scale)
        init_weights(self.decoder)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.dino_loss = DINOLoss(
            dino.prototypes,
            student_temp=dino.student_temp,
            center_momentum=dino.center_momentum,
        )

    def train(self, mode: bool = True) -> PretrainModel:
        super().train(mode)
        self.teacher.eval()  # never trained by gradients
        return self

    def forward(self, batch: dict[str, torch.Tensor], it: int) -> dict[str, torch.Tensor]:
        return self.step(batch, it)

    def step(self, batch: dict[str, torch.Tensor], it: int) -> dict[str, torch.Tensor]:
        """All loss terms for one batch at optimizer step ``it``.

        Returns scalars ``loss`` (weighted total, the one to back-propagate), ``mae``,
        ``dino``, ``koleo`` and ``teacher_temp``. In training mode this batch's teacher logits
        are accumulated for the centre update that ``update_center`` applies after the
        optimizer step (the loss uses the centre of the previous step).
        """
        mae_cfg, dino_cfg = self.terms.mae, self.terms.dino
        glob = batch["global_crops"]
        b, g = glob.shape[:2]
        views = glob.transpose(0, 1).flatten(0, 1)  # [G*B, 3, H, W], view-major
        keep = batch["keep"].transpose(0, 1).flatten(0, 1)  # [G*B, K]
        masked = batch["masked"].transpose(0, 1).flatten(0, 1)  # [G*B, M]
        backbone, head = self.student["backbone"], self.student["dino_head"]

        tokens, grid = backbone.forward_tokens(views, keep)  # [G*B, P+K, D]
        pred = self.decoder(tokens, keep, masked, grid)  # [G*B, M, unit^2*3]
        target = reconstruction_target(views, self.arch.stride, mae_cfg.target_downsample)
        mae = norm_pix_loss(pred, target, masked, eps=mae_cfg.norm_pix_eps)

        cls = [tokens[:, 0]]  # [G*B, D]
        local = batch.get("local_crops")
        if local is not None and local.shape[1] > 0:
            local_tokens, _ = backbone.forward_tokens(local.transpose(0, 1).flatten(0, 1))
            cls.append(local_tokens[:, 0])  # [L*B, D]
        student_logits = head(torch.cat(cls)).unflatten(0, (-1, b))  # [G+L, B, K]

        with torch.no_grad():
            t_tokens, _ = self.teacher["backbone"].forward_tokens(views)
            teacher_logits = self.teacher["dino_head"](t_tokens[:, 0]).unflatten(0, (g, b))  # [G, B, K]
        temp = teacher_temperature(
            it,
            start=dino_cfg.teacher_temp_start,
            end=dino_cfg.teacher_temp,
            warmup=dino_cfg.teacher_temp_warmup_iters,
        )
        dino = self.dino_loss(student_logits, self.dino_loss.teacher_probs(teacher_logits, temp))
        koleo = torch.stack([koleo_loss(c) for c in tokens[:, 0].unflatten(0, (g, b))]).mean()
        if self.training:
            self.dino_loss.accumulate(teacher_logits)

        terms = {"mae": mae, "dino": dino, "koleo": koleo}
        w = self.terms
        total = weighted_total(terms, mae=w.mae.weight, dino=w.dino.weight, koleo=w.koleo.weight)
        temp_t = torch.tensor(temp, dtype=torch.float64, device=total.device)
        return {"loss": total, **terms, "teacher_temp": temp_t}

    def momentum(self, it: int) -> float:
        """Teacher EMA momentum after optimizer step ``it`` (cosine 0.992 -> 1 over the run)."""
        d = self.terms.dino
        return teacher_momentum(it, start=d.momentum_start, end=d.momentum_end, total=self.iterations)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """``teacher <- momentum * teacher + (1 - momentum) * student``, parameter-wise.

        On FSDP2-sharded parameters each rank updates its own shard (student and teacher are
        sharded alike, ``shard_units``), so this needs no communication.
        """
        t_params = [_local(p) for p in self.teacher.parameters()]
        s_params = [_local(p.detach()) for p in self.student.parameters()]
        torch._foreach_mul_(t_params, momentum)
        torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)

    def update_center(self) -> None:
        """Move the DINO centre with this optimizer step's teacher logits (collective)."""
        self.dino_loss.update_center()

    def shard_units(self) -> list[nn.Module]:
        """FSDP2 units, inner first: each block (and tokenizer) of the student and of the
        teacher, both DINO heads and the MAE decoder (module docstring)."""
        units: list[nn.Module] = []
        for part in (self.student, self.teacher):
            backbone = part["backbone"]
            if backbone.tokenizer is not None:
                units.append(backbone.tokenizer)
            units += list(backbone.blocks)
            units.append(part["dino_head"])
        units.append(self.decoder)
        return units

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Trainable parameters split into decayed and not decayed.

        No decay for 1-D tensors (norm weights, biases, LayerScale), any ``.bias``, and the
        position / special tokens (cls, storage, mask, window cls, position embeddings).
        """
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            skip = p.ndim <= 1 or name.endswith(".bias") or any(t in name for t in NO_DECAY_NAMES)
            (no_decay if skip else decay).append(p)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def export_teacher(
        self, path: str | os.PathLike, *, dtype: torch.dtype | None = None, metadata: dict[str, str] | None = None
    ) -> Path:
        """Write the teacher backbone as a release-layout pretrain checkpoint (bare keys).

        Unsharded models only; a sharded run gathers the full state first (``save_teacher``).
        """
        state = {f"teacher.backbone.{k}": v for k, v in self.teacher["backbone"].state_dict().items()}
        return save_teacher(state, self.arch, path, input_size=self.input_size, dtype=dtype, metadata=metadata)


def _local(p: torch.Tensor) -> torch.Tensor:
    """The local shard of an FSDP2 (DTensor) parameter, or the tensor itself."""
    from torch.distributed.tensor import DTensor

    return p.to_local() if isinstance(p, DTensor) else p


def save_teacher(
    state: Mapping[str, torch.Tensor],
    arch: BackboneArch,
    path: str | os.PathLike,
    *,
    input_size: tuple[int, int],
    dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write the ``teacher.backbone.*`` tensors of a full ``PretrainModel`` state dict as a
    release-layout pretrain checkpoint: the backbone's keys with no prefix, every one of them
    (a strict load of the file into a Sapiens2 backbone of ``arch`` finds nothing missing or
    unexpected), and ``sapiens2.*`` metadata (task ``pretrain``, ``arch``, ``input_size``)."""
    from sapiens2_cli.weights import save_model

    prefix = "teacher.backbone."
    teacher = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    with torch.device("meta"):
        model = Sapiens2Model("pretrain", arch, None)
    model.backbone.load_state_dict(teacher, strict=True, assign=True)
    model.info = ModelInfo(task="pretrain", arch=arch, head=None, input_size=tuple(input_size))
    return save_model(model, path, dtype=dtype, metadata=metadata)
