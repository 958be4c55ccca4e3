"""A generic iteration-based training loop: accumulation, bf16 autocast, clipping, logging,
validation, best tracking and exactly resumable checkpoints, on one process or under torchrun.

The loop knows nothing about tasks. ``sapiens2 finetune`` (``train/finetune.py``) plugs in a
Sapiens2 model and a task loss; other objectives (pretraining) plug in their own pieces
through these extension points:

``step(batch) -> {"loss": scalar, **other terms}``
    One micro-batch forward pass (run under autocast when ``precision`` is bf16), usually a
    closure over the wrapped model. The loop backpropagates ``loss / grad_accum``; every
    returned term is logged (averaged over micro-batches, the steps between log lines and the
    ranks), so every rank must return the same keys at every step. A model with its own
    ``model.step(batch)`` passes that bound method.
``batches(start) -> iterator of batches``
    The data stream of this rank, resumed after ``start`` micro-batches already consumed by it
    (with ``sampler.InfiniteSampler(start=start * batch_size)`` the draws are exactly those an
    uninterrupted run would have seen). Tensors are moved to the device by the loop.
``after_step: [fn(step)]``
    Called after every optimizer step, e.g. an EMA teacher update or a temperature schedule.
``evaluate(step) -> {metric: value}``
    Called on every rank with the model in eval mode at each ``eval_interval`` and at the end;
    ``best`` names the metric that selects ``on_best(step, metrics)`` (called on every rank,
    it may gather weights) and is kept in checkpoints.
``extra_state: {name: Stateful}``
    Objects saved in and restored from checkpoints besides model, optimizer and scheduler
    (``checkpoint.Stateful``: e.g. a streamed dataset's position; an EMA teacher that is a
    submodule of ``model`` is saved with the model).

Order within an optimizer step: micro-batches (gradient all-reduce only on the last), clip
(global L2 norm; a non-finite norm skips the update and is logged), ``optimizer.step()``,
``scheduler.step()``, ``after_step`` hooks, log line, validation, checkpoint. Resuming restores
model, optimizer, scheduler, per-rank RNG states, the data position and the running log sums,
so a resumed run continues the same loss curve (bit for bit on CPU).

Stopping: SIGTERM (what schedulers send before they kill a job) or SIGINT ends the run after
the optimizer step in progress, with a checkpoint; the ranks agree on the step (a flag summed
over ranks after every step, next to the step's own synchronisation on the gradient norm), so
``--resume`` continues exactly. A second signal stops at once, without a checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from sapiens2_cli.distributed import DistEnv, all_reduce_sum, broadcast_object
from sapiens2_cli.train.checkpoint import (
    Stateful,
    capture_rng,
    latest_checkpoint,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from sapiens2_cli.train.parallel import grad_sync
from sapiens2_cli.train.run_log import MetricsLog, Progress

__all__ = ["BestMetric", "FitResult", "LoopSettings", "Trainer", "to_device"]

log = logging.getLogger("sapiens2")

StepFn = Callable[[Any], Mapping[str, torch.Tensor]]


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    """Loop knobs; intervals in optimizer steps (0 = only at the end for ``eval_interval``)."""

    iterations: int
    grad_accum: int = 1
    clip_grad: float | None = None  # global L2 norm; None = no clipping
    precision: Literal["fp32", "bf16"] = "fp32"
    log_interval: int = 10
    eval_interval: int = 0
    checkpoint_interval: int = 1000
    keep: int | None = None  # newest periodic checkpoints kept; None = all
    sharded: bool = False  # per-rank shards (checkpoint.save_checkpoint)

    @classmethod
    def of(cls, cfg: Any, *, eval_interval: int = 0) -> LoopSettings:
        """The settings of a run config's ``train`` and ``checkpoint`` sections."""
        return cls(
            iterations=cfg.train.iterations,
            grad_accum=cfg.train.grad_accum,
            clip_grad=cfg.train.clip_grad,
            precision=cfg.train.precision,
            log_interval=cfg.train.log_interval,
            eval_interval=eval_interval,
            checkpoint_interval=cfg.checkpoint.interval,
            keep=cfg.checkpoint.keep,
            sharded=cfg.checkpoint.sharded,
        )


@dataclasses.dataclass(frozen=True)
class BestMetric:
    """The validation metric that defines the best model."""

    name: str
    higher_is_better: bool

    def improves(self, value: float, best: float | None) -> bool:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return False
        if best is None:
            return True
        return value > best if self.higher_is_better else value < best


@dataclasses.dataclass(frozen=True)
class FitResult:
    step: int
    finished: bool  # reached ``iterations``
    best: float | None
    best_step: int | None
    stopped_by: int | None = None  # the signal that ended the run early (after a checkpoint)


@contextlib.contextmanager
def stop_signals() -> Iterator[list[int]]:
    """While active, SIGTERM / SIGINT append their number to the yielded list instead of
    ending the process; a second one raises ``KeyboardInterrupt``. Outside the main thread
    (where handlers cannot be installed) the list stays empty."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def on_signal(signum: int, frame: object) -> None:
        if received:
            raise KeyboardInterrupt
        received.append(signum)
        log.warning("%s: stopping after this step with a checkpoint (again to stop at once)",
                    signal.Signals(signum).name)  # fmt: skip

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def to_device(batch: Any, device: torch.device) -> Any:
    """Tensors of a (nested) batch moved to ``device``; everything else unchanged."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


class Trainer:
    """Runs ``step`` for ``settings.iterations`` optimizer steps (module docstring).

    Args:
        model: the module being trained, as wrapped for parallelism (gradient sync, clipping and
            state dicts go through it).
        optimizer, scheduler: built over ``model``'s parameters; the scheduler steps once per
            optimizer step.
        run_dir: where ``metrics.jsonl`` and ``checkpoints/`` go.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        *,
        step: StepFn,
        batches: Callable[[int], Iterator[Any]],
        settings: LoopSettings,
        env: DistEnv,
        run_dir: str | Path,
        evaluate: Callable[[int], dict[str, Any]] | None = None,
        best: BestMetric | None = None,
        on_best: Callable[[int, dict[str, Any]], None] | None = None,
        after_step: Sequence[Callable[[int], None]] = (),
        extra_state: Mapping[str, Stateful] | None = None,
    ) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.step_fn, self.batches, self.settings, self.env = step, batches, settings, env
        self.run_dir = Path(run_dir)
        self.evaluate, self.best_metric, self.on_best = evaluate, best, on_best
        self.after_step, self.extra_state = list(after_step), dict(extra_state or {})
        self.step = 0
        self.consumed = 0  # micro-batches this rank has drawn
        self.best: float | None = None
        self.best_step: int | None = None
        self._window: dict[str, torch.Tensor] = {}
        self._window_steps = 0
        self._last_lr = 0.0

    # ------------------------------------------------------------------ state
    def _trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "consumed": self.consumed,
            "world_size": self.env.world_size,
            "best": self.best,
            "best_step": self.best_step,
        }

    def _local_state(self) -> dict[str, Any]:
        window = {k: v.detach().cpu() for k, v in self._window.items()}
        return {
            "rng": capture_rng(self.env.device),
            "window": window,
            "window_steps": self._window_steps,
        }

    def _restore(self, path: Path) -> None:
        trainer, local = load_checkpoint(
            path,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            env=self.env,
            extra=self.extra_state,
        )
        self.step, self.best, self.best_step = (
            trainer["step"],
            trainer["best"],
            trainer["best_step"],
        )
        saved_world = trainer["world_size"]
        total = trainer["consumed"] * saved_world  # micro-batches drawn by all ranks
        self.consumed = -(-total // self.env.world_size)
        if local is not None:
            restore_rng(local["rng"], self.env.device)
            self._window = {k: v.to(self.env.device) for k, v in local["window"].items()}
            self._window_steps = local["window_steps"]
        else:
            log.warning(
                "the checkpoint was written by %d ranks and this job has %d: RNG states are "
                "re-seeded and the data stream continues from draw %d, so the run goes on "
                "but not bit for bit",
                saved_world,
                self.env.world_size,
                total,
            )
        log.info("resumed from %s at step %d", path, self.step)

    # ------------------------------------------------------------------ one step
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.settings.precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=torch.bfloat16)

    def _optimizer_step(self, stream: Iterator[Any]) -> None:
        accum = self.settings.grad_accum
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, torch.Tensor] = {}
        for micro in range(accum):
            batch = to_device(next(stream), self.env.device)
            self.consumed += 1
            with grad_sync(self.model, micro == accum - 1):
                with self._autocast():
                    terms = self.step_fn(batch)
                (terms["loss"] / accum).backward()
            for name, value in terms.items():
                value = value.detach().double() / accum
                sums[name] = sums[name] + value if name in sums else value
        clip = self.settings.clip_grad
        norm = nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip else math.inf)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        lr = max(group["lr"] for group in self.optimizer.param_groups)
        if torch.isfinite(norm).item():
            self.optimizer.step()
        else:
            log.warning("step %d: non-finite gradient norm, update skipped", self.step + 1)
        self.scheduler.step()
        sums["grad_norm"] = norm.detach().double()
        for name, value in sums.items():
            self._window[name] = self._window[name] + value if name in self._window else value
        self._window_steps += 1
        self._last_lr = lr

    def _log_record(self, elapsed: float) -> dict[str, Any]:
        names = sorted(self._window)
        values = torch.stack([self._window[n].reshape(()) for n in names]).to(self.env.device)
        values = all_reduce_sum(values, self.env) / (self.env.world_size * self._window_steps)
        mean = dict(zip(names, values.tolist(), strict=True))
        record: dict[str, Any] = {"step": self.step, "split": "train", "loss": mean.pop("loss")}
        grad_norm = mean.pop("grad_norm")
        record.update(mean)
        record.update(lr=self._last_lr, grad_norm=grad_norm, elapsed_s=round(elapsed, 3))
        self._window, self._window_steps = {}, 0
        return record

    def _validate(self, metrics_log: MetricsLog, progress: Progress) -> None:
        self.model.eval()
        try:
            metrics = self.evaluate(self.step)
        finally:
            self.model.train()
        record: dict[str, Any] = {"step": self.step, "split": "val", **metrics}
        if self.best_metric is not None:
            value = broadcast_object(metrics.get(self.best_metric.name), self.env)
            if value is None:
                raise KeyError(
                    f"validation returned no {self.best_metric.name!r} (got {sorted(metrics)})"
                )
            if self.best_metric.improves(value, self.best):
                self.best, self.best_step = value, self.step
                record["best"] = True
                if self.on_best is not None:
                    self.on_best(self.step, metrics)
        metrics_log.write(record)
        progress.report(record)

    def _checkpoint(self) -> None:
        save_checkpoint(
            self.run_dir,
            self.step,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            trainer=self._trainer_state(),
            local=self._local_state(),
            env=self.env,
            extra=self.extra_state,
            keep=self.settings.keep,
            sharded=self.settings.sharded,
        )

    # ------------------------------------------------------------------ the loop
    def fit(self, *, resume: bool = False, stop_at: int | None = None) -> FitResult:
        """Train from scratch or from the newest checkpoint of ``run_dir`` (``resume``).

        ``stop_at``: stop (with a checkpoint) after this step even if ``iterations`` is larger;
        a later ``fit(resume=True)`` continues from there.
        """
        s = self.settings
        path = latest_checkpoint(self.run_dir) if resume else None
        if path is not None:
            self._restore(path)
        metrics_log = MetricsLog(self.run_dir / "metrics.jsonl", self.env, keep_until=self.step)
        end = s.iterations if stop_at is None else min(stop_at, s.iterations)
        progress = Progress(total=s.iterations, start=self.step, env=self.env)
        stream = self.batches(self.consumed)
        t0 = time.monotonic()
        self.model.train()
        stopped_by = None
        with contextlib.ExitStack() as stack:
            received = stack.enter_context(stop_signals())
            stack.callback(progress.close)
            while self.step < end:
                self._optimizer_step(stream)
                self.step += 1
                for hook in self.after_step:
                    hook(self.step)
                last = self.step == s.iterations
                progress.update(self.step)
                if self.step % s.log_interval == 0 or last:
                    record = self._log_record(time.monotonic() - t0)
                    metrics_log.write(record)
                    progress.report(record)
                if self.evaluate is not None and (
                    last or (s.eval_interval > 0 and self.step % s.eval_interval == 0)
                ):
                    self._validate(metrics_log, progress)
                stopped_by = self._agreed_stop(received)
                if self.step % s.checkpoint_interval == 0 or last or self.step == end or stopped_by:
                    self._checkpoint()
                if stopped_by:
                    break
        return FitResult(
            step=self.step,
            finished=self.step >= s.iterations,
            best=self.best,
            best_step=self.best_step,
            stopped_by=stopped_by,
        )

    def _agreed_stop(self, received: list[int]) -> int | None:
        """The signal that stops every rank after this step, if any rank received one."""
        if not self.env.distributed:
            return received[0] if received else None
        flag = all_reduce_sum(torch.tensor([1.0 if received else 0.0]), self.env)
        if flag.item() == 0:
            return None
        return received[0] if received else signal.SIGTERM
