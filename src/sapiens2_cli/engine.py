"""The pipelined run loop behind ``sapiens2 predict``.

Three kinds of threads, so that the model never waits on the disk or the CPU-side work:

1. reader threads (:func:`readers.prefetch`): read, decode, and make each task's model inputs
   (for video frames, decoded ahead on a thread of their own by :mod:`sapiens2_cli.frames`);
2. the main thread: batches model inputs per task (any mix of images; the inputs of one
   untiled image stay in one batch unless ``--compile`` fixes the batch size) and runs the
   :class:`~sapiens2_cli.predict.Predictor`, and folds the outputs of tiles into their
   image's blend as they come (:mod:`sapiens2_cli.tasks.tiled`), so a tiled frame never holds
   more than its overlaps; for a task that needs a detector first (pose), it also runs the
   detector on batches of images, and crop threads make the model inputs from what it found
   (:mod:`sapiens2_cli.detection_stage`);
3. writer threads (:class:`writers.WriterPool`): post-process each finished image on the
   model's device, render overlays, encode and write atomically; a video frame's per-video
   outputs go to its streams (:mod:`sapiens2_cli.streams`).

All bookkeeping (counts, failures, progress) happens on the main thread. A video frame is
counted as one item. A task that fails for an image (pre-processing, detector, model,
post-processing, writing) fails that image for that task only; the image's other tasks go on.
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

from sapiens2_cli import frames
from sapiens2_cli.detection_stage import DetectionStage
from sapiens2_cli.plan import PredictOptions, Work
from sapiens2_cli.progress import Progress
from sapiens2_cli.readers import ReadError, prefetch, read_image
from sapiens2_cli.runinfo import Failure, RunRecord
from sapiens2_cli.streams import VideoStreams
from sapiens2_cli.tasks.base import ModelInput
from sapiens2_cli.tasks.tiled import TiledAccumulator
from sapiens2_cli.timing import ForwardTimer
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


def image_boundary(queue: Sequence[tuple[Any, int]], size: int) -> int:
    """Length of the next batch: ``size`` entries, or more so that no image's inputs are split."""
    end = min(size, len(queue))
    while end < len(queue) and queue[end][0] is queue[end - 1][0]:
        end += 1
    return end


@dataclasses.dataclass
class Loaded:
    """What a reader thread hands over: the image and its model inputs per task, or the reason it failed."""

    work: Work
    pts: int | None = None  # video frames: the source timestamp
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
    raws: dict[str, list[Any]]  # a tile's entry is True once folded into its accumulator
    open_tasks: int
    failures: list[Failure] = dataclasses.field(default_factory=list)
    accumulators: dict[str, TiledAccumulator] = dataclasses.field(default_factory=dict)


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
        self.detection = DetectionStage(
            tasks, record, batch_size=options.batch_size, workers=options.num_workers, enqueue=self.enqueue,
            fail=lambda state, name, reason: self.close_task(state, name, Failure.of(state.work.item, reason, name)),
        )  # fmt: skip
        self.estimates: dict[str, tuple[int, int]] = {}  # video rel -> (frames expected, total at its start)
        task_objects = {name: lt.task for name, lt in tasks.items()}
        self.streams = VideoStreams(self.output, task_objects, fmt=options.fmt, vis=options.vis)
        self.frame_options = frames.frame_options(
            task_objects, tasks, output=self.output, fmt=options.fmt, vis=options.vis, overwrite=options.overwrite,
            stride=options.stride, start=options.start, end=options.end,
        )  # fmt: skip

    # ----------------------------------------------------------------- reader threads

    def load(self, job: Work | frames.Event) -> Loaded | frames.Event:
        """Read, decode and pre-process one image or decoded frame (runs on a reader thread);
        the other video events pass through."""
        decoded_s = 0.0
        if isinstance(job, frames.FrameJob):
            work, pts, image, decoded_s = job.work, job.pts, job.image, job.decode_s
        elif isinstance(job, Work):
            work, pts, image = job, None, None
        else:
            return job
        loaded = Loaded(work, pts)
        t0 = time.perf_counter()
        try:
            image = read_image(work.item.path) if image is None else image
        except ReadError as err:
            loaded.error = str(err)
            return loaded
        finally:
            loaded.decode_s = decoded_s + time.perf_counter() - t0  # a frame was decoded on the video's thread
        t1 = time.perf_counter()
        for name in work.tasks:
            try:
                loaded.inputs[name] = self.tasks[name].prepare_item(image, work.item)
            except (ValueError, cv2.error) as err:
                loaded.task_errors[name] = f"cannot pre-process ({err})"
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
        jobs = frames.in_background(frames.expand(work, self.frame_options), depth=2)
        try:
            wait_start = time.perf_counter()
            for _, loaded in prefetch(jobs, self.load, workers=workers, depth=depth):
                self.record.timings["wait_for_input"] += time.perf_counter() - wait_start
                if isinstance(loaded, Loaded):
                    self.accept(loaded)
                else:
                    self.video_event(loaded)
                self.detection.harvest()
                self.collect(self.pool.harvest())
                wait_start = time.perf_counter()
            self.detection.finish()
            for name in self.queues:
                self.flush(name, final=True)
            self.collect(self.pool.drain())
        except KeyboardInterrupt:
            # Stop taking items, but let the queued writes finish and count them: the files
            # are atomic either way, and the record then matches what is on disk.
            self.collect(self.pool.drain())
            raise
        finally:
            jobs.close()
            self.streams.abort_all()  # only unfinished ones remain: their videos were not done
            self.pool.close()
            self.detection.close()
            cv2.setNumThreads(cv_threads)
            self.record.processing_s = time.perf_counter() - start
            self.record.timings["forward"] += self.timer.total()

    def accept(self, loaded: Loaded) -> None:
        self.record.timings["decode"] += loaded.decode_s
        self.record.timings["preprocess"] += loaded.preprocess_s
        work = loaded.work
        if work.item.frame is not None:
            self.count_frame(work.item, work.tasks)
        if loaded.error is not None:
            self.fail_item(work, Failure.of(work.item, loaded.error))
            return
        state = ItemState(work, loaded.image, inputs={}, raws={}, open_tasks=len(work.tasks))
        for name in work.tasks:
            if self.streams.has(work.item, name):
                self.streams.expect(work.item, name, loaded.pts)
        for name in work.tasks:
            if name in loaded.task_errors:
                self.close_task(state, name, Failure.of(work.item, loaded.task_errors[name], name))
            elif loaded.inputs[name] is None:
                self.detection.add(state, name)
            else:
                self.enqueue(state, name, loaded.inputs[name])

    def enqueue(self, state: ItemState, name: str, inputs: list[ModelInput]) -> None:
        """Queue an image's model inputs for ``name`` and run the batches that are full."""
        state.inputs[name] = inputs
        state.raws[name] = [None] * len(inputs)
        acc = TiledAccumulator.of(self.tasks[name].task.tile_rule, inputs)
        if acc is not None:
            state.accumulators[name] = acc
        if not inputs:  # nothing to run (e.g. a pose image with no person)
            self.finish(state, name)
            return
        self.queues[name].extend((state, i) for i in range(len(inputs)))
        self.flush(name)

    def flush(self, name: str, *, final: bool = False) -> None:
        """Run full batches of ``name``'s queue (and the remainder when ``final``).

        The inputs of one image (pose: its people) stay in one batch; tiles need not, as they are
        folded into their image's blend one by one, and ``--compile`` fixes the batch size.
        """
        queue, size = self.queues[name], self.options.batch_size
        whole_images = not self.options.compile and self.tasks[name].tiler is None
        while len(queue) >= size or (final and queue):
            end = image_boundary(queue, size) if whole_images else min(size, len(queue))
            batch, queue[:] = queue[:end], queue[end:]
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
            self.close_task(state, name, Failure.of(state.work.item, f"model failed ({err})", name))
            return
        self.timer.stop(timer)
        for j, (state, i) in enumerate(batch):
            acc = state.accumulators.get(name)
            if acc is None:
                state.raws[name][i] = unbatch(raw, j)
            elif not state.raws[name] or not self.fold(state, name, acc, i, unbatch(raw, j)):
                continue  # this image's blend already failed
            if all(r is not None for r in state.raws[name]):
                self.finish(state, name)

    def fold(self, state: ItemState, name: str, acc: TiledAccumulator, index: int, raw: Any) -> bool:
        """Blend one tile's output into its image (in tile order, so results are reproducible)."""
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                acc.add(index, raw)
        except (RuntimeError, ValueError) as err:
            state.raws[name] = []  # the image's other tiles are ignored from now on
            self.close_task(state, name, Failure.of(state.work.item, f"tile blending failed ({err})", name))
            return False
        finally:
            self.record.timings["tile_blend"] += time.perf_counter() - t0
        state.raws[name][index] = True
        return True

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
        item = state.work.item
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                acc = state.accumulators.pop(name, None)
                if acc is not None:
                    pred = acc.result()
                else:
                    pred = task.postprocess(state.raws[name], state.inputs[name], state.image.shape[:2])
        except (RuntimeError, ValueError) as err:
            self.streams.drop(item, name)
            return state, name, Failure.of(item, f"post-processing failed ({err})", name), time.perf_counter() - t0, 0.0
        finally:
            state.raws[name] = []  # free device memory early
        t1 = time.perf_counter()
        written: list[Path] = []
        try:
            files = task.render_item(pred, state.image, item, self.options.fmt, self.options.vis)
            if item.frame is not None:
                files = task.frame_outputs(files, item)
            streamed = {spec: content for spec, content in files.items() if spec.stream}
            for spec, content in files.items():
                if not spec.stream:
                    target = spec.path(self.output, name, item)
                    write_file(target, content)
                    written.append(target)
            for spec, content in streamed.items():
                self.streams.put(item, name, spec, content)
        except ITEM_ERRORS as err:
            for target in written:
                target.unlink(missing_ok=True)
            self.streams.drop(item, name)
            return state, name, Failure.of(item, f"cannot write outputs ({err})", name), t1 - t0, 0.0
        return state, name, None, t1 - t0, time.perf_counter() - t1

    def collect(self, futures: list[Future]) -> None:
        for future in futures:
            state, name, failure, post_s, write_s = future.result()
            self.record.timings["postprocess"] += post_s
            self.record.timings["write"] += write_s
            self.close_task(state, name, failure)
        for failure in self.streams.failures():
            self.record.failures.append(failure)
            self.progress.error(failure.line())

    # ----------------------------------------------------------------- bookkeeping

    def close_task(self, state: ItemState, name: str, failure: Failure | None) -> None:
        self.record.per_task[name]["failed" if failure else "ok"] += 1
        if failure is not None:
            self.streams.drop(state.work.item, name)  # no-op unless a stream still waits for it
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

    # ----------------------------------------------------------------- videos

    def count_frame(self, item: Any, tasks: Sequence[str]) -> None:
        """A frame of a video joins the run's items; the tasks it does not need are skipped."""
        self.record.total += 1
        for name in self.tasks:
            if name not in tasks:
                self.record.per_task[name]["skipped"] += 1

    def video_event(self, event: frames.Event) -> None:
        if isinstance(event, frames.VideoStart):
            self.streams.start(event.item, event.info, event.streams)
            self.progress.add_total(event.estimate)
            self.estimates[event.item.rel] = (event.estimate, self.record.total)
        elif isinstance(event, frames.FrameSkipped):
            self.count_frame(event.item, ())
            self.record.skipped += 1
            self.progress.advance(skipped=1)
        elif isinstance(event, frames.FrameFailed):
            self.record.total += 1
            self.fail_item(Work(event.item, event.tasks), Failure.of(event.item, event.reason))
        elif isinstance(event, frames.VideoEnd):
            self.streams.end(event.item, complete=event.error is None)
            estimate, before = self.estimates.pop(event.item.rel)
            self.progress.add_total(self.record.total - before - estimate)  # the frames there were
            if event.error is not None:
                failure = Failure.of(event.item, event.error)
                self.record.failures.append(failure)
                self.progress.error(failure.line())
