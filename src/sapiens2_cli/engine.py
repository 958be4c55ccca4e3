"""The pipelined run loop behind ``sapiens2 predict``.

Three kinds of threads, so that the model never waits on the disk or the CPU-side work:

1. reader threads (:func:`readers.prefetch`): read, decode, and make each task's model inputs;
2. the main thread: batches model inputs per task (any mix of images; the inputs of one image
   stay in one batch unless ``--compile`` fixes the batch size) and runs the
   :class:`~sapiens2_cli.predict.Predictor`; for a task that needs a detector first (pose),
   it also runs the detector on batches of images, and crop threads make the model inputs
   from what it found;
3. writer threads (:class:`writers.WriterPool`): post-process each finished image on the
   model's device, render overlays, encode and write atomically.

All bookkeeping (counts, failures, progress) happens on the main thread. A task that fails
for an image (pre-processing, detector, model, post-processing, writing) fails that image for
that task only; the image's other tasks go on.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
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
    from sapiens2_cli.predict import LoadedTask

# Errors that belong to one item (a bad file, an odd image, a full disk, out of memory on a
# huge image); anything else is a defect and stops the run.
ITEM_ERRORS = (OSError, ValueError, RuntimeError, cv2.error)


def unbatch(raw: Any, i: int) -> Any:
    """Sample ``i`` of a batch-first tensor or tuple of tensors."""
    return tuple(r[i] for r in raw) if isinstance(raw, tuple) else raw[i]


def image_boundary(queue: Sequence[tuple[Any, int]], size: int) -> int:
    """Length of the next batch: ``size`` entries, or more so that no image's inputs are split."""
    end = min(size, len(queue))
    while end < len(queue) and queue[end][0] is queue[end - 1][0]:
        end += 1
    return end


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
    inputs: dict[str, list[ModelInput] | None] = dataclasses.field(default_factory=dict)  # None: detector first
    task_errors: dict[str, str] = dataclasses.field(default_factory=dict)
    error: str | None = None
    decode_s: float = 0.0
    preprocess_s: float = 0.0


@dataclasses.dataclass
class ItemState:
    """An image in flight: raw outputs collected per task until all its model inputs are back."""

    work: Work
    image: np.ndarray
    inputs: dict[str, list[ModelInput]]  # filled per task once its inputs exist
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
        self.detect_queues: dict[str, list[ItemState]] = {name: [] for name in tasks}
        self.crops: list[tuple[ItemState, str, Future]] = []
        self.crop_pool: ThreadPoolExecutor | None = None
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
        for name in work.tasks:
            lt = self.tasks[name]
            try:
                loaded.inputs[name] = lt.task.prepare_item(image, lt.input_hw, work.item)
            except (ValueError, cv2.error) as err:
                loaded.task_errors[name] = f"cannot pre-process ({err})"
        loaded.preprocess_s = time.perf_counter() - t1
        loaded.image = image
        return loaded

    def crop_job(self, name: str, image: np.ndarray, found: Any) -> tuple[list[ModelInput] | str, float]:
        """Model inputs from a detector's result (runs on a crop thread); an error as a reason."""
        lt = self.tasks[name]
        t0 = time.perf_counter()
        try:
            return lt.task.prepare_detected(image, lt.input_hw, found), time.perf_counter() - t0
        except (ValueError, cv2.error) as err:
            return f"cannot pre-process ({err})", time.perf_counter() - t0

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
                self.harvest_crops()
                self.collect(self.pool.harvest())
                wait_start = time.perf_counter()
            for name in self.detect_queues:
                self.flush_detection(name, final=True)
            self.harvest_crops(wait=True)
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
            if self.crop_pool is not None:
                self.crop_pool.shutdown(wait=True, cancel_futures=True)
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
        state = ItemState(work, loaded.image, inputs={}, raws={}, open_tasks=len(work.tasks))
        path = str(work.item.path)
        for name in work.tasks:
            if name in loaded.task_errors:
                self.close_task(state, name, Failure(path, loaded.task_errors[name], name))
            elif loaded.inputs[name] is None:
                self.detect_queues[name].append(state)
                self.flush_detection(name)
            else:
                self.enqueue(state, name, loaded.inputs[name])

    def enqueue(self, state: ItemState, name: str, inputs: list[ModelInput]) -> None:
        """Queue an image's model inputs for ``name`` and run the batches that are full."""
        state.inputs[name] = inputs
        state.raws[name] = [None] * len(inputs)
        if not inputs:  # nothing to run
            self.finish(state, name)
            return
        self.queues[name].extend((state, i) for i in range(len(inputs)))
        self.flush(name)

    def flush(self, name: str, *, final: bool = False) -> None:
        """Run full batches of ``name``'s queue (and the remainder when ``final``)."""
        queue, size = self.queues[name], self.options.batch_size
        while len(queue) >= size or (final and queue):
            end = min(size, len(queue)) if self.options.compile else image_boundary(queue, size)
            batch, queue[:] = queue[:end], queue[end:]
            self.run_batch(name, batch)

    def flush_detection(self, name: str, *, final: bool = False) -> None:
        """Run the detector on full batches of images waiting for it (the rest when ``final``)."""
        queue, size = self.detect_queues[name], self.options.batch_size
        while len(queue) >= size or (final and queue):
            batch, queue[:] = queue[:size], queue[size:]
            self.detect(name, batch)

    def detect(self, name: str, batch: list[ItemState]) -> None:
        """One detector batch; each image's result goes to a crop thread."""
        lt = self.tasks[name]
        t0 = time.perf_counter()
        try:
            found = lt.task.detect([state.image for state in batch])
        except (RuntimeError, ValueError) as err:
            self.record.timings["detect"] += time.perf_counter() - t0
            if len(batch) > 1:  # e.g. out of memory: retry one by one, so only the culprit fails
                if lt.predictor.device.type == "cuda":
                    torch.cuda.empty_cache()
                for state in batch:
                    self.detect(name, [state])
                return
            state = batch[0]
            self.close_task(state, name, Failure(str(state.work.item.path), f"person detector failed ({err})", name))
            return
        self.record.timings["detect"] += time.perf_counter() - t0
        workers = self.options.num_workers
        for state, result in zip(batch, found, strict=True):
            if workers == 0:
                future: Future = Future()
                future.set_result(self.crop_job(name, state.image, result))
            else:
                if self.crop_pool is None:
                    self.crop_pool = ThreadPoolExecutor(max(1, workers // 2), thread_name_prefix="sapiens2-crop")
                future = self.crop_pool.submit(self.crop_job, name, state.image, result)
            self.crops.append((state, name, future))

    def harvest_crops(self, *, wait: bool = False) -> None:
        """Queue the model inputs of finished crop jobs (of all of them when ``wait``)."""
        jobs, self.crops = self.crops, []
        for state, name, future in jobs:
            if not (wait or future.done()):
                self.crops.append((state, name, future))
                continue
            inputs, seconds = future.result()
            self.record.timings["preprocess"] += seconds
            if isinstance(inputs, str):
                self.close_task(state, name, Failure(str(state.work.item.path), inputs, name))
            else:
                self.enqueue(state, name, inputs)

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
            files = task.render_item(pred, state.image, state.work.item, self.options.fmt, self.options.vis)
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
