"""The pipelined run loop behind ``sapiens2 predict``.

Three kinds of threads, so that the model never waits on the disk or the CPU-side work:

1. reader threads (:func:`readers.prefetch`): read, decode, and make each task's model inputs;
2. the main thread: batches model inputs per task (any mix of images) and runs the
   :class:`~sapiens2_cli.predict.Predictor`, and nothing else;
3. writer threads (:class:`writers.WriterPool`): post-process each finished image on the
   model's device, render overlays, encode and write atomically.

All bookkeeping (counts, failures, progress) happens on the main thread.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import torch

from sapiens2_cli.plan import PredictOptions, Work
from sapiens2_cli.progress import Progress
from sapiens2_cli.readers import ReadError, prefetch, read_image
from sapiens2_cli.runinfo import Failure, RunRecord
from sapiens2_cli.tasks.base import ModelInput
from sapiens2_cli.writers import WriterPool, write_file

if TYPE_CHECKING:
    from concurrent.futures import Future

    from sapiens2_cli.predict import LoadedTask

# Errors that belong to one item (a bad file, an odd image, a full disk, out of memory on a
# huge image); anything else is a defect and stops the run.
ITEM_ERRORS = (OSError, ValueError, RuntimeError, cv2.error)


def unbatch(raw: Any, i: int) -> Any:
    """Sample ``i`` of a batch-first tensor or tuple of tensors."""
    return tuple(r[i] for r in raw) if isinstance(raw, tuple) else raw[i]


class ForwardTimer:
    """Seconds spent in the model. CUDA kernels run asynchronously, so there the time comes
    from events recorded around each forward (read at the end, without stalling the queue)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.events: list[tuple[Any, Any]] = []

    def start(self, device: torch.device) -> Any:
        if device.type == "cuda":
            begin = torch.cuda.Event(enable_timing=True)
            begin.record()
            return begin
        return time.perf_counter()

    def stop(self, begin: Any) -> None:
        if isinstance(begin, float):
            self.seconds += time.perf_counter() - begin
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self.events.append((begin, end))
        if len(self.events) > 1000:  # keep the list short on long runs: read the finished ones
            self.events[0][1].synchronize()
            done = 0  # events on one stream complete in order
            while done < len(self.events) and self.events[done][1].query():
                done += 1
            self.seconds += sum(b.elapsed_time(e) for b, e in self.events[:done]) / 1000
            del self.events[:done]

    def total(self) -> float:
        for _, end in self.events:
            end.synchronize()
        seconds = self.seconds + sum(b.elapsed_time(e) for b, e in self.events) / 1000
        self.seconds, self.events = seconds, []
        return seconds


@dataclasses.dataclass
class Loaded:
    """What a reader thread hands over: the image and its model inputs per task, or the reason it failed."""

    work: Work
    image: np.ndarray | None = None
    inputs: dict[str, list[ModelInput]] = dataclasses.field(default_factory=dict)
    error: str | None = None
    decode_s: float = 0.0
    preprocess_s: float = 0.0


@dataclasses.dataclass
class ItemState:
    """An image in flight: raw outputs collected per task until all its model inputs are back."""

    work: Work
    image: np.ndarray
    inputs: dict[str, list[ModelInput]]
    raws: dict[str, list[Any]]
    open_tasks: int
    failures: list[Failure] = dataclasses.field(default_factory=list)


class Runner:
    """Runs the pending work of one predict run; see the module notes."""

    def __init__(self, tasks: dict[str, LoadedTask], record: RunRecord, progress: Progress, *,
                 options: PredictOptions) -> None:  # fmt: skip
        self.tasks = tasks
        self.record = record
        self.progress = progress
        self.options = options
        self.output = Path(options.output)
        self.queues: dict[str, list[tuple[ItemState, int]]] = {name: [] for name in tasks}
        self.timer = ForwardTimer()

    # ----------------------------------------------------------------- reader threads

    def load(self, work: Work) -> Loaded:
        """Read, decode and pre-process one item (runs on a reader thread)."""
        loaded = Loaded(work)
        t0 = time.perf_counter()
        try:
            image = read_image(work.item.path)
        except ReadError as err:
            loaded.error = str(err)
            return loaded
        finally:
            loaded.decode_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        try:
            for name in work.tasks:
                lt = self.tasks[name]
                loaded.inputs[name] = lt.task.prepare(image, lt.input_hw)
        except (ValueError, cv2.error) as err:
            loaded.error = f"cannot pre-process ({err})"
            return loaded
        finally:
            loaded.preprocess_s = time.perf_counter() - t1
        loaded.image = image
        return loaded

    # ----------------------------------------------------------------- main thread

    def run(self, work: Sequence[Work]) -> None:
        opts = self.options
        workers = opts.num_workers
        writers = max(2, workers // 2)
        self.pool = WriterPool(writers, max_pending=2 * writers + opts.batch_size)
        depth = max(2 * opts.batch_size, 2 * workers)
        # The reader and writer threads are the parallelism; OpenCV's own worker pool on top
        # would only compete with the model for the cores.
        cv_threads = cv2.getNumThreads()
        cv2.setNumThreads(1)
        start = time.perf_counter()
        try:
            wait_start = time.perf_counter()
            for _, loaded in prefetch(work, self.load, workers=workers, depth=depth):
                self.record.timings["wait_for_input"] += time.perf_counter() - wait_start
                self.accept(loaded)
                self.collect(self.pool.harvest())
                wait_start = time.perf_counter()
            for name in self.queues:
                self.flush(name, final=True)
            self.collect(self.pool.drain())
        except KeyboardInterrupt:
            # Stop taking items, but let the queued writes finish and count them: the files
            # are atomic either way, and the record then matches what is on disk.
            self.collect(self.pool.drain())
            raise
        finally:
            self.pool.close()
            cv2.setNumThreads(cv_threads)
            self.record.processing_s = time.perf_counter() - start
            self.record.timings["forward"] += self.timer.total()

    def accept(self, loaded: Loaded) -> None:
        self.record.timings["decode"] += loaded.decode_s
        self.record.timings["preprocess"] += loaded.preprocess_s
        work = loaded.work
        if loaded.error is not None:
            self.fail_item(work, Failure(str(work.item.path), loaded.error))
            return
        state = ItemState(
            work, loaded.image, loaded.inputs,
            raws={name: [None] * len(loaded.inputs[name]) for name in work.tasks},
            open_tasks=len(work.tasks),
        )  # fmt: skip
        for name in work.tasks:
            if not loaded.inputs[name]:  # nothing to run (e.g. a pose image with no person)
                self.finish(state, name)
                continue
            self.queues[name].extend((state, i) for i in range(len(loaded.inputs[name])))
            self.flush(name)

    def flush(self, name: str, *, final: bool = False) -> None:
        """Run full batches of ``name``'s queue (and the remainder when ``final``)."""
        queue, size = self.queues[name], self.options.batch_size
        while len(queue) >= size or (final and queue):
            batch, queue[:] = queue[:size], queue[size:]
            self.run_batch(name, batch)

    def run_batch(self, name: str, batch: list[tuple[ItemState, int]]) -> None:
        lt = self.tasks[name]
        pixels = torch.from_numpy(np.stack([s.inputs[name][i].pixels for s, i in batch]))  # [B, H, W, 3]
        timer = self.timer.start(lt.predictor.device)
        try:
            raw = lt.predictor(pixels)
        except (RuntimeError, ValueError) as err:
            self.timer.stop(timer)
            if len(batch) > 1:  # e.g. out of memory: retry one by one, so only the culprit fails
                if lt.predictor.device.type == "cuda":
                    torch.cuda.empty_cache()
                for entry in batch:
                    self.run_batch(name, [entry])
                return
            state = batch[0][0]
            self.close_task(state, name, Failure(str(state.work.item.path), f"model failed ({err})", name))
            return
        self.timer.stop(timer)
        for j, (state, i) in enumerate(batch):
            state.raws[name][i] = unbatch(raw, j)
            if all(r is not None for r in state.raws[name]):
                self.finish(state, name)

    def finish(self, state: ItemState, name: str) -> None:
        """Hand one image's raw outputs for ``name`` to a writer thread."""
        self.collect(self.pool.submit(self.finish_job, state, name))

    def finish_job(self, state: ItemState, name: str) -> tuple[ItemState, str, Failure | None, float, float]:
        """Post-process on the model's device, render and write one image's files for one task.

        Runs on a writer thread, so that the main thread goes straight on to the next batch.
        On failure the files already written for this image and task are removed: an item is
        either complete or absent (and redone by the next run).
        """
        task = self.tasks[name].task
        path = str(state.work.item.path)
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                pred = task.postprocess(state.raws[name], state.inputs[name], state.image.shape[:2])
        except (RuntimeError, ValueError) as err:
            return state, name, Failure(path, f"post-processing failed ({err})", name), time.perf_counter() - t0, 0.0
        finally:
            state.raws[name] = []  # free device memory early
        t1 = time.perf_counter()
        written: list[Path] = []
        try:
            files = task.render(pred, state.image, self.options.fmt, self.options.vis)
            for spec, content in files.items():
                target = spec.path(self.output, name, state.work.item)
                write_file(target, content)
                written.append(target)
        except ITEM_ERRORS as err:
            for target in written:
                target.unlink(missing_ok=True)
            return state, name, Failure(path, f"cannot write outputs ({err})", name), t1 - t0, 0.0
        return state, name, None, t1 - t0, time.perf_counter() - t1

    def collect(self, futures: list[Future]) -> None:
        for future in futures:
            state, name, failure, post_s, write_s = future.result()
            self.record.timings["postprocess"] += post_s
            self.record.timings["write"] += write_s
            self.close_task(state, name, failure)

    # ----------------------------------------------------------------- bookkeeping

    def close_task(self, state: ItemState, name: str, failure: Failure | None) -> None:
        self.record.per_task[name]["failed" if failure else "ok"] += 1
        if failure is not None:
            state.failures.append(failure)
            self.record.failures.append(failure)
            self.progress.error(failure.line())
        state.open_tasks -= 1
        if state.open_tasks == 0:
            state.image = None
            if state.failures:
                self.record.failed += 1
                self.progress.advance(failed=1)
            else:
                self.record.ok += 1
                self.progress.advance(ok=1)

    def fail_item(self, work: Work, failure: Failure) -> None:
        """An item that failed before any task ran (unreadable, not an image, too small...)."""
        self.record.failures.append(failure)
        self.record.failed += 1
        for name in work.tasks:
            self.record.per_task[name]["failed"] += 1
        self.progress.error(failure.line())
        self.progress.advance(failed=1)
