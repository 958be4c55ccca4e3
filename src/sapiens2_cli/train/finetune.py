"""``sapiens2 finetune``: a resolved config -> a run folder with a fine-tuned model.

Run folder ``RUN/``:

* ``config.yaml`` — the resolved configuration, written before anything else runs;
* ``metrics.jsonl`` — training and validation lines (``run_log.py``);
* ``train.log`` — the plain log of rank 0;
* ``checkpoints/step_<N>.pt`` — resumable training state (``checkpoint.py``), every
  ``checkpoint.interval`` steps and at the end, the newest ``checkpoint.keep`` kept;
* ``best.safetensors`` — the weights with the best main validation metric so far
  (``evaluation.MAIN_METRIC``), when there is validation data;
* ``final.safetensors`` — the weights after the last step, in the released layout with
  ``sapiens2.*`` metadata (task, architecture, head, input size, class or keypoint names), so
  ``load_model("RUN/final.safetensors")`` and ``sapiens2 predict --checkpoint`` use it as is.

A folder that already holds a run is only continued with ``resume=True`` (``--resume``), and
only with the same configuration; ``resume=True`` on an empty folder starts a new run.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sapiens2_cli.distributed import (
    DistEnv,
    barrier,
    broadcast_object,
    init_distributed,
    setup_logging,
    shutdown,
)
from sapiens2_cli.train.config import Config, ConfigError
from sapiens2_cli.train.loop import FitResult, LoopSettings, Trainer
from sapiens2_cli.train.model_setup import Labels, build_model, initialise, labels_of
from sapiens2_cli.train.parallel import full_state, parallelize, unwrap
from sapiens2_cli.train.run_folder import (
    RunError,
    config_differences,
    on_main,
    prepare_run_dir,
)

__all__ = [
    "RunError",
    "config_differences",
    "export_weights",
    "finetune",
    "prepare_run_dir",
    "resolve_run_config",
]

log = logging.getLogger("sapiens2")


def resolve_run_config(
    recipe: str | Path,
    overrides: Sequence[str] = (),
    *,
    data: Sequence[str | Path] = (),
    val_data: Sequence[str | Path] = (),
) -> Config:
    """``config.resolve`` plus the command line's folders (replacing ``data.train`` /
    ``data.val`` when given) and the model-shape checks (``model.arch`` / ``model.head``).

    Raises:
        ConfigError: naming the bad key.
    """
    from sapiens2_cli.train.config import DatasetSpec, resolve, validate
    from sapiens2_cli.train.model_setup import run_arch, run_head

    cfg = resolve(recipe, overrides)
    if cfg.task == "pretrain":
        raise ConfigError("a pretraining recipe: run it with `sapiens2 pretrain`")
    changes = {}
    if data:
        changes["train"] = [DatasetSpec(path=str(p)) for p in data]
    if val_data:
        changes["val"] = [DatasetSpec(path=str(p)) for p in val_data]
    if changes:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **changes))
        validate(cfg)
    arch = run_arch(cfg.model)
    if any(side % arch.stride for side in cfg.model.input_size):
        raise ConfigError(
            f"model.input_size {list(cfg.model.input_size)} must be multiples of the {arch.stride}-px cell of "
            f"the {cfg.model.size} backbone"
        )
    run_head(cfg, arch, out_channels=1)
    return cfg


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def export_weights(
    model: torch.nn.Module, cfg: Config, labels: Labels, path: Path, env: DistEnv, *, step: int
) -> None:
    """Write the trained weights as released-layout safetensors on rank 0 (collective)."""
    from sapiens2_cli.weights import save_model

    state, _ = full_state(model)
    if env.is_main:
        target = build_model(cfg, labels, device="meta")
        target.load_state_dict(state, strict=True, assign=True)
        metadata = dict(labels.metadata(cfg.task), finetune_step=str(step))
        if cfg.task == "pointmap":
            metadata["canonical_focal"] = repr(float(cfg.augment.canonical_focal))
        save_model(target, path, metadata=metadata)
    barrier(env)


def _loader(cfg: Config, dataset: Any, env: DistEnv) -> Callable[[int], Iterator[Any]]:
    from sapiens2_cli.train.datasets import collate
    from sapiens2_cli.train.sampler import InfiniteSampler

    def batches(start: int) -> Iterator[Any]:
        sampler = InfiniteSampler(
            len(dataset),
            seed=cfg.train.seed,
            rank=env.rank,
            world_size=env.world_size,
            start=start * cfg.train.batch_size,
        )
        workers = cfg.data.num_workers
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=cfg.train.batch_size,
            sampler=sampler,
            collate_fn=collate,
            num_workers=workers,
            pin_memory=env.device.type == "cuda",
            persistent_workers=workers > 0,
        )
        return iter(loader)

    return batches


def finetune(
    cfg: Config,
    run_dir: str | Path,
    *,
    resume: bool = False,
    stop_at: int | None = None,
    device: str | None = None,
) -> FitResult:
    """Fine-tune as ``cfg`` says into ``run_dir`` (module docstring) on this process's rank.

    Under torchrun every rank calls this; a single process trains alone. ``stop_at`` ends the
    job after that step with a checkpoint (a later ``resume=True`` call continues).
    """
    env = init_distributed(device=device)
    try:
        return _finetune(cfg, Path(run_dir), env, resume=resume, stop_at=stop_at)
    finally:
        shutdown(env)


def _finetune(
    cfg: Config, run_dir: Path, env: DistEnv, *, resume: bool, stop_at: int | None
) -> FitResult:
    from sapiens2_cli.train.datasets import build_dataset
    from sapiens2_cli.train.evaluation import MAIN_METRIC, Evaluator
    from sapiens2_cli.train.losses import build_loss
    from sapiens2_cli.train.optim import build_optimizer, build_scheduler

    if not cfg.data.train:
        raise ConfigError("no training data: pass --data DIR or set data.train")
    cfg = dataclasses.replace(cfg, output_dir=str(run_dir))
    resuming = on_main(env, lambda: prepare_run_dir(cfg, run_dir, resume=resume))
    resuming = broadcast_object(resuming, env)
    setup_logging(env, run_dir / "train.log")
    log.info(
        "%s %s run in %s on %d %s rank(s)%s",
        "resuming" if resuming else "starting",
        cfg.task,
        run_dir,
        env.world_size,
        env.device.type,
        f" ({cfg.train.distributed})" if env.distributed else "",
    )

    train_set = build_dataset(cfg, split="train")
    val_set = build_dataset(cfg, split="val") if cfg.data.val else None
    labels = labels_of(cfg.task, train_set)
    log.info(
        "training data: %d samples in %d folder(s)%s",
        len(train_set),
        len(train_set.folders),
        f"; validation: {len(val_set)} samples" if val_set is not None else "",
    )

    _seed(cfg.train.seed)  # identical initialisation on every rank
    # resuming: the checkpoint supplies the weights, so model.init is not read again
    model = on_main(env, lambda: _initial_model(cfg, labels, load_init=not resuming))
    if not env.is_main:
        model = build_model(cfg, labels, device="meta")
    _seed(cfg.train.seed + env.rank)
    wrapped = parallelize(
        model,
        env,
        mode=cfg.train.distributed,
        precision=cfg.train.precision,
        activation_checkpointing=cfg.train.activation_checkpointing,
        compile=cfg.train.compile,
    )
    inner = unwrap(wrapped)
    optimizer = build_optimizer(inner, cfg.optim, num_layers=inner.backbone.arch.num_layers)
    scheduler = build_scheduler(
        optimizer, cfg.schedule, iterations=cfg.train.iterations, base_lr=cfg.optim.lr
    )
    loss_fn = build_loss(cfg.task, cfg.loss, class_weights=labels.class_weights)

    def step(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return loss_fn(wrapped(batch["image"]), batch)

    evaluate = None
    if val_set is not None:
        evaluator = Evaluator(
            cfg.task,
            val_set,
            env,
            batch_size=cfg.eval.batch_size,
            precision=cfg.train.precision,
            num_classes=labels.out_channels,
            flip_index=list(labels.flip_index)
            if cfg.eval.flip_test and labels.flip_index
            else None,
            max_samples=cfg.eval.max_samples,
        )

        def evaluate(step_: int) -> dict[str, Any]:
            return evaluator(wrapped)

    def on_best(step_: int, metrics: dict[str, Any]) -> None:
        export_weights(wrapped, cfg, labels, run_dir / "best.safetensors", env, step=step_)

    settings = LoopSettings.of(cfg, eval_interval=cfg.eval.interval)
    trainer = Trainer(
        wrapped,
        optimizer,
        scheduler,
        step=step,
        batches=_loader(cfg, train_set, env),
        settings=settings,
        env=env,
        run_dir=run_dir,
        evaluate=evaluate,
        best=MAIN_METRIC[cfg.task] if evaluate is not None else None,
        on_best=on_best,
    )
    result = trainer.fit(resume=resuming, stop_at=stop_at)
    if result.finished:
        final = run_dir / "final.safetensors"
        export_weights(wrapped, cfg, labels, final, env, step=result.step)
        log.info("wrote %s", final)
    else:
        log.info("stopped after step %d (checkpoint written); continue with --resume", result.step)
    return result


def _initial_model(cfg: Config, labels: Labels, *, load_init: bool) -> torch.nn.Module:
    model = build_model(cfg, labels)
    if load_init:
        initialise(model, cfg.model)
    n = sum(p.numel() for p in model.parameters())
    log.info("model: %s %s, %.1f M parameters", cfg.task, model.info.size or "custom", n / 1e6)
    return model
