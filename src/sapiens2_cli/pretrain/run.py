"""A minimal single-process pretraining driver: data stream, AdamW, schedules, EMA, outputs.

Run folder: ``config.yaml`` (resolved config, written first), ``metrics.jsonl`` (one line per
optimizer step: ``step`` = steps completed, ``loss``, ``mae``, ``dino``, ``koleo``, ``lr``,
``teacher_temp``, ``momentum``, ``grad_norm``, ``served``, ``corrupt``), ``last.pt`` (model,
optimizer, data position, step: an exact resume point) and ``final.safetensors`` (the teacher
backbone in the release pretrain layout). All per-step logic lives in ``PretrainModel.step``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from sapiens2_cli.pretrain.augment import MultiCrop
from sapiens2_cli.pretrain.config import PretrainConfig
from sapiens2_cli.pretrain.data import PretrainStream, make_loader
from sapiens2_cli.pretrain.model import PretrainModel
from sapiens2_cli.pretrain.schedules import learning_rate

CHECKPOINT = "last.pt"


def build_stream(
    cfg: PretrainConfig, data_dir: str | os.PathLike, *, rank: int | None = None, world_size: int | None = None
) -> PretrainStream:
    """The multi-crop data stream of ``cfg`` over ``data_dir`` (folders or tar shards)."""
    arch = cfg.model.build_arch()
    grid = (cfg.crops.global_size[0] // arch.stride, cfg.crops.global_size[1] // arch.stride)
    return PretrainStream(
        data_dir,
        MultiCrop(cfg.crops, cfg.masking, grid=grid),
        seed=cfg.seed,
        shuffle_window=cfg.data.shuffle_window,
        num_workers=cfg.data.num_workers,
        rank=rank,
        world_size=world_size,
    )


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def train(
    cfg: PretrainConfig,
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    steps: int | None = None,
    *,
    device: str | torch.device = "cpu",
    resume: bool = False,
) -> PretrainModel:
    """Pretrain until ``steps`` optimizer steps are done (default ``cfg.optim.iters``).

    With ``resume``, continues exactly from ``out_dir/last.pt``. Returns the model.
    """
    cfg.validate()
    out, device = Path(out_dir), torch.device(device)
    out.mkdir(parents=True, exist_ok=True)
    stop = steps if steps is not None else cfg.optim.iters
    torch.manual_seed(cfg.seed)
    model = PretrainModel(cfg).to(device)
    opt_cfg = cfg.optim
    optimizer = torch.optim.AdamW(
        model.param_groups(opt_cfg.weight_decay), lr=opt_cfg.lr, betas=opt_cfg.betas, fused=device.type == "cuda"
    )
    stream = build_stream(cfg, data_dir)
    start = 0
    checkpoint = out / CHECKPOINT
    if resume:
        if not checkpoint.is_file():
            raise FileNotFoundError(f"{checkpoint}: nothing to resume from")
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        stream.load_state_dict(state["data"])
        start = state["step"]
    else:
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        (out / "metrics.jsonl").write_text("")
    params = [p for p in model.parameters() if p.requires_grad]
    amp = opt_cfg.precision == "bf16"
    batches = iter(make_loader(stream, cfg.data.batch_size))
    model.train()
    with open(out / "metrics.jsonl", "a") as metrics:
        for it in range(start, stop):
            t0 = time.perf_counter()
            batch = next(batches)
            stream.note(batch)
            lr = learning_rate(it, lr=opt_cfg.lr, min_lr=opt_cfg.min_lr, warmup=opt_cfg.warmup_iters, total=opt_cfg.iters)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                terms = model.step(_to(batch, device), it)
            if not torch.isfinite(terms["loss"]):
                raise FloatingPointError(f"step {it + 1}: non-finite loss {terms}")
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, opt_cfg.clip_grad)
            optimizer.step()
            momentum = model.momentum(it)
            model.update_teacher(momentum)
            row = {"step": it + 1, **{k: float(v.detach()) for k, v in terms.items()}}
            row.update(lr=lr, momentum=momentum, grad_norm=float(grad_norm), time=time.perf_counter() - t0)
            row.update(stream.counts())
            if (it + 1) % cfg.data.log_every == 0 or it + 1 == stop:
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
    torch.save(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "data": stream.state_dict(), "step": stop},
        checkpoint,
    )
    model.export_teacher(out / "final.safetensors", metadata={"pretrain_steps": str(stop)})
    return model
