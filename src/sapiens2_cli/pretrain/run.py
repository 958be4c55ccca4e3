"""``sapiens2 pretrain``: a resolved ``task: pretrain`` config -> a run folder with a backbone.

Run folder ``RUN/`` (the layout of every training command, ``train/run_folder.py``):

* ``config.yaml`` — the resolved configuration, written before anything else runs;
* ``metrics.jsonl`` — one line per ``train.log_interval`` steps: ``step``, ``split``,
  ``loss`` (weighted total), ``mae``, ``dino``, ``koleo``, ``teacher_temp``, ``momentum``
  (the EMA momentum applied after the step), ``lr``, ``grad_norm``, ``elapsed_s``;
* ``train.log`` — the plain log of rank 0;
* ``checkpoints/step_<N>.pt`` — exactly resumable state (``train/checkpoint.py``): the whole
  ``PretrainModel`` (student, MAE decoder, EMA teacher, DINO centre), AdamW, LR schedule,
  per-rank RNG, and under ``extra.data`` each rank's data-stream position;
* ``final.safetensors`` — the teacher backbone in the released pretrain layout (bare backbone
  keys, every one of them), for ``load_model`` and ``finetune model.init=RUN/final.safetensors``.

One loop: ``train/loop.Trainer``. Its step is the (wrapped) ``PretrainModel`` forward, i.e.
``PretrainModel.step(batch, it)``; after each optimizer step the teacher follows the student
by EMA, then the DINO centre moves with the step's teacher logits. Parallelism is the shared
``parallelize``: DDP, or FSDP2 with the teacher sharded like the student
(``PretrainModel.shard_units``, ``model.py``).

Data: rank ``r`` of ``N`` with ``W = data.num_workers`` loader workers streams consumers
``r*W .. r*W+W-1`` of ``N*W`` (``data.py``); a batch comes from one consumer. Resuming needs
the same ``N`` and ``W`` (the stream refuses otherwise). Equivalence: ``N`` ranks with batch
``B`` and no workers see, per optimizer step, exactly the samples of one process with batch
``B``, ``train.grad_accum=N`` and ``data.num_workers=N``; every loss term (KoLeo's neighbours
are those of one micro-batch / one rank's batch) and the centre update are the same, so the
two runs agree up to floating-point summation order.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from sapiens2_cli.distributed import (
    DistEnv,
    barrier,
    broadcast_object,
    gather_objects,
    init_distributed,
    setup_logging,
    shutdown,
)
from sapiens2_cli.models.arch import size_name
from sapiens2_cli.pretrain.augment import MultiCrop
from sapiens2_cli.pretrain.config import check
from sapiens2_cli.pretrain.data import PretrainStream, make_loader
from sapiens2_cli.pretrain.model import PretrainModel, save_teacher
from sapiens2_cli.train.config import (
    Config,
    ConfigError,
    DatasetSpec,
    resolve,
    validate,
)
from sapiens2_cli.train.loop import FitResult, LoopSettings, Trainer
from sapiens2_cli.train.model_setup import run_arch
from sapiens2_cli.train.optim import build_scheduler
from sapiens2_cli.train.parallel import full_state, parallelize, unwrap
from sapiens2_cli.train.run_folder import RunError, on_main, prepare_run_dir

__all__ = ["StreamState", "build_stream", "pretrain", "recipe_name", "resolve_pretrain_config"]

log = logging.getLogger("sapiens2")


def recipe_name(recipe: str | os.PathLike) -> str:
    """``tiny`` / ``1b`` -> ``pretrain/tiny`` / ``pretrain/1b``; paths and ``<task>/<name>`` as is."""
    text = str(recipe)
    if text.endswith((".yaml", ".yml")) or "/" in text or os.sep in text:
        return text
    return f"pretrain/{text}"


def resolve_pretrain_config(
    recipe: str | os.PathLike, overrides: Sequence[str] = (), *, data: str | os.PathLike | None = None
) -> Config:
    """The shared ``config.resolve`` of a pretraining recipe (``recipe_name``) and overrides,
    with ``data`` (the command line's folder) replacing ``data.train``, checked for pretraining
    (``pretrain.config.check``).

    Raises:
        ConfigError: naming the bad key.
    """
    cfg = resolve(recipe_name(recipe), overrides)
    if data is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train=[DatasetSpec(path=str(data))]))
        validate(cfg)
    check(cfg, run_arch(cfg.model))
    return cfg


def build_stream(
    cfg: Config, data_dir: str | os.PathLike, *, rank: int | None = None, world_size: int | None = None
) -> PretrainStream:
    """The multi-crop stream of ``cfg`` over ``data_dir`` (a folder of images or of tar shards).

    ``rank`` / ``world_size`` default to the process group's (1 process when there is none).

    Raises:
        DataError: ``data_dir`` is missing or holds no images or shards.
    """
    from sapiens2_cli.train.files import DataError

    arch = run_arch(cfg.model)
    h, w = cfg.model.input_size
    views = MultiCrop(cfg.augment, global_size=(h, w), grid=(h // arch.stride, w // arch.stride))
    try:
        return PretrainStream(
            data_dir,
            views,
            seed=cfg.train.seed,
            shuffle_window=cfg.data.shuffle_window,
            num_workers=cfg.data.num_workers,
            rank=rank,
            world_size=world_size,
        )
    except FileNotFoundError as err:
        raise DataError(str(err)) from None


class StreamState:
    """The data position in checkpoints (``checkpoint.Stateful``): every rank's stream state,
    gathered on rank 0 (collective); on load each rank takes its own."""

    def __init__(self, stream: PretrainStream, env: DistEnv) -> None:
        self.stream, self.env = stream, env

    def state_dict(self) -> dict[str, Any]:
        ranks = gather_objects(self.stream.state_dict(), self.env)
        return {"ranks": ranks} if self.env.is_main else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ranks = state["ranks"]
        if len(ranks) != self.env.world_size:
            raise RunError(
                f"the checkpoint was written by {len(ranks)} rank(s) and this job has "
                f"{self.env.world_size}: the data stream resumes only on the same number of ranks"
            )
        try:
            self.stream.load_state_dict(ranks[self.env.rank])
        except ValueError as err:
            raise RunError(str(err)) from None

    def batches(self, batch_size: int) -> Iterator[dict[str, Any]]:
        """This rank's batches from the current position, each noted as consumed when drawn."""
        for batch in make_loader(self.stream, batch_size):
            self.stream.note(batch)
            yield batch


def pretrain(
    cfg: Config,
    run_dir: str | os.PathLike,
    *,
    resume: bool = False,
    stop_at: int | None = None,
    device: str | None = None,
) -> FitResult:
    """Pretrain as ``cfg`` says into ``run_dir`` (module docstring) on this process's rank.

    Under torchrun every rank calls this; a single process trains alone. ``stop_at`` ends the
    job after that step with a checkpoint (a later ``resume=True`` call continues exactly).
    """
    env = init_distributed(device=device)
    try:
        return _pretrain(cfg, Path(run_dir), env, resume=resume, stop_at=stop_at)
    finally:
        shutdown(env)


def _pretrain(cfg: Config, run_dir: Path, env: DistEnv, *, resume: bool, stop_at: int | None) -> FitResult:
    if not cfg.data.train:
        raise ConfigError("no training data: pass --data DIR or set data.train")
    check(cfg, run_arch(cfg.model))
    cfg = dataclasses.replace(cfg, output_dir=str(run_dir))
    resuming = broadcast_object(on_main(env, lambda: prepare_run_dir(cfg, run_dir, resume=resume)), env)
    setup_logging(env, run_dir / "train.log")
    log.info(
        "%s pretraining in %s on %d %s rank(s)%s",
        "resuming" if resuming else "starting",
        run_dir,
        env.world_size,
        env.device.type,
        f" ({cfg.train.distributed})" if env.distributed else "",
    )
    stream = build_stream(cfg, cfg.data.train[0].path, rank=env.rank, world_size=env.world_size)
    data = StreamState(stream, env)

    # resuming: the checkpoint supplies the weights, so model.init is not read again
    model = on_main(env, lambda: _initial_model(cfg, load_init=not resuming))
    if not env.is_main:
        with torch.device("meta"):
            model = PretrainModel(cfg)
    model.student["backbone"].grad_checkpointing = cfg.train.activation_checkpointing
    wrapped = parallelize(
        model,
        env,
        mode=cfg.train.distributed,
        precision=cfg.train.precision,
        compile=cfg.train.compile,
        units=model.shard_units(),
    )
    inner: PretrainModel = unwrap(wrapped)
    groups = inner.param_groups(cfg.optim.weight_decay)
    optimizer = torch.optim.AdamW(
        groups,
        lr=cfg.optim.lr,
        betas=cfg.optim.betas,
        eps=cfg.optim.eps,
        fused=all(p.is_cuda for g in groups for p in g["params"]),
    )
    scheduler = build_scheduler(optimizer, cfg.schedule, iterations=cfg.train.iterations, base_lr=cfg.optim.lr)

    def step(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        it = trainer.step  # optimizer steps done before this one
        terms = wrapped(batch, it)
        momentum = torch.tensor(inner.momentum(it), dtype=torch.float64, device=terms["loss"].device)
        return {**terms, "momentum": momentum}

    def follow(step_: int) -> None:  # after optimizer step ``step_`` (1-based)
        inner.update_teacher(inner.momentum(step_ - 1))
        inner.update_center()

    settings = LoopSettings.of(cfg)
    trainer = Trainer(
        wrapped,
        optimizer,
        scheduler,
        step=step,
        batches=lambda start: data.batches(cfg.train.batch_size),  # position: extra_state
        settings=settings,
        env=env,
        run_dir=run_dir,
        after_step=[follow],
        extra_state={"data": data},
    )
    result = trainer.fit(resume=resuming, stop_at=stop_at)
    if result.finished:
        final = run_dir / "final.safetensors"
        state, _ = full_state(wrapped)
        if env.is_main:
            save_teacher(
                state, inner.arch, final, input_size=inner.input_size, metadata={"pretrain_steps": str(result.step)}
            )
            log.info("wrote %s (teacher backbone)", final)
        barrier(env)
    else:
        log.info("stopped after step %d (checkpoint written); continue with --resume", result.step)
    return result


def _initial_model(cfg: Config, *, load_init: bool) -> PretrainModel:
    """The seeded random initialisation, then ``model.init`` (a pretrain backbone) if set."""
    torch.manual_seed(cfg.train.seed)
    model = PretrainModel(cfg)
    if load_init and cfg.model.init is not None:
        from sapiens2_cli.weights import CheckpointError, load_model

        ref = f"pretrain-{cfg.model.size}" if cfg.model.init == "pretrain" else cfg.model.init
        source = load_model(ref, task="pretrain").backbone
        if source.arch != model.arch:
            raise CheckpointError(
                f"model.init {ref}: its backbone differs from this run's (model.size / model.arch); "
                "set them to match, or model.init=null"
            )
        model.student["backbone"].load_state_dict(source.state_dict(), strict=True)
        model.teacher.load_state_dict(model.student.state_dict(), strict=True)
        log.info("initialised student and teacher backbones from %s", ref)
    n = sum(p.numel() for p in model.student["backbone"].parameters())
    log.info("backbone %s, %.1f M parameters (+ an EMA teacher copy)", size_name(model.arch) or "custom", n / 1e6)
    return model
