"""Images whose model inputs wait for a second model (pose: the person detector).

The run loop (:mod:`sapiens2_cli.engine`) hands such images here. The detector runs on the
main thread on batches of images (:meth:`Task.detect <sapiens2_cli.tasks.base.Task.detect>`);
crop threads then make each image's model inputs from what it found
(:meth:`Task.prepare_detected <sapiens2_cli.tasks.base.Task.prepare_detected>`), and the
finished ones go back to the run loop through ``enqueue``; an image whose detection or crops
fail goes back through ``fail`` with the reason.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import torch

from sapiens2_cli.runinfo import RunRecord
from sapiens2_cli.tasks.base import ModelInput

if TYPE_CHECKING:
    from sapiens2_cli.engine import ItemState
    from sapiens2_cli.predict import LoadedTask


class DetectionStage:
    """Detector batches per task (main thread) and crop jobs (``workers // 2`` threads, or inline
    when ``workers`` is 0). ``enqueue(state, task, inputs)`` receives an image's model inputs,
    ``fail(state, task, reason)`` an image whose detection or pre-processing failed."""

    def __init__(
        self, tasks: dict[str, LoadedTask], record: RunRecord, *, batch_size: int, workers: int,
        enqueue: Callable[[ItemState, str, list[ModelInput]], None], fail: Callable[[ItemState, str, str], None],
    ) -> None:  # fmt: skip
        self.tasks = tasks
        self.record = record
        self.batch_size = batch_size
        self.workers = workers
        self.enqueue = enqueue
        self.fail = fail
        self.queues: dict[str, list[ItemState]] = {name: [] for name in tasks}
        self.crops: list[tuple[ItemState, str, Future]] = []
        self.pool: ThreadPoolExecutor | None = None

    def add(self, state: ItemState, name: str) -> None:
        """Queue an image for ``name``'s detector and run the batches that are full."""
        self.queues[name].append(state)
        self.flush(name)

    def flush(self, name: str, *, final: bool = False) -> None:
        """Run the detector on full batches of images waiting for it (the rest when ``final``)."""
        queue, size = self.queues[name], self.batch_size
        while len(queue) >= size or (final and queue):
            batch, queue[:] = queue[:size], queue[size:]
            self.detect(name, batch)

    def finish(self) -> None:
        """Detect every image still waiting and queue all their inputs (the end of a run)."""
        for name in self.queues:
            self.flush(name, final=True)
        self.harvest(wait=True)

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
            self.fail(batch[0], name, f"person detector failed ({err})")
            return
        self.record.timings["detect"] += time.perf_counter() - t0
        for state, result in zip(batch, found, strict=True):
            if self.workers == 0:
                future: Future = Future()
                future.set_result(self.crop_job(name, state.image, result))
            else:
                if self.pool is None:
                    self.pool = ThreadPoolExecutor(max(1, self.workers // 2), thread_name_prefix="sapiens2-crop")
                future = self.pool.submit(self.crop_job, name, state.image, result)
            self.crops.append((state, name, future))

    def crop_job(self, name: str, image: np.ndarray, found: Any) -> tuple[list[ModelInput] | str, float]:
        """Model inputs from a detector's result (runs on a crop thread); an error as a reason."""
        lt = self.tasks[name]
        t0 = time.perf_counter()
        try:
            return lt.task.prepare_detected(image, lt.input_hw, found), time.perf_counter() - t0
        except (ValueError, cv2.error) as err:
            return f"cannot pre-process ({err})", time.perf_counter() - t0

    def harvest(self, *, wait: bool = False) -> None:
        """Queue the model inputs of finished crop jobs (of all of them when ``wait``)."""
        jobs, self.crops = self.crops, []
        for state, name, future in jobs:
            if not (wait or future.done()):
                self.crops.append((state, name, future))
                continue
            inputs, seconds = future.result()
            self.record.timings["preprocess"] += seconds
            if isinstance(inputs, str):
                self.fail(state, name, inputs)
            else:
                self.enqueue(state, name, inputs)

    def close(self) -> None:
        """Stop the crop threads (pending jobs are cancelled)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
