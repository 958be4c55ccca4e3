"""What a ``predict`` run will do, decided before anything runs.

:class:`PredictOptions` is the typed form of the command line. :func:`model_refs` decides which
checkpoint each task uses; :func:`check_options` that the formats, tiling and video options fit
the tasks; :func:`pending_work` which items still need which tasks (sharding first, then
skip-existing; a video's frames are checked as they are decoded). Every problem found here is a
usage error (:class:`PlanError`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from sapiens2_cli.models.zoo import TASK_SIZES, find_record
from sapiens2_cli.sources import Item
from sapiens2_cli.tasks import TASK_NAMES
from sapiens2_cli.tasks.pose_options import PoseOptions

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
FORMATS: tuple[str, ...] = ("exr", "npy", "safetensors")
TileMode = Literal["off", "auto"] | tuple[int, int]
DEFAULT_SIZE = "0.4b"
PREDICT_SIZES: tuple[str, ...] = tuple(dict.fromkeys(s for t in TASK_NAMES for s in TASK_SIZES[t]))


class PlanError(ValueError):
    """The command asks for something impossible (a usage error)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class PredictOptions:
    """Everything ``sapiens2 predict`` was asked to do."""

    inputs: tuple[str, ...]
    output: Path
    tasks: tuple[str, ...] = ()
    size: str = DEFAULT_SIZE
    checkpoints: tuple[str, ...] = ()  # "REF" or "TASK=REF"
    input_size: tuple[int, int] | None = None  # (H, W); None: each model's own
    fmt: Literal["exr", "npy", "safetensors"] | None = None  # None: each task's default (EXR maps, NPY features)
    vis: bool = False
    recursive: bool = False
    batch_size: int = 1
    workers: int | None = None  # decode / write threads; None: from the CPU count
    device: str = "auto"
    precision: Precision = "fp32"
    compile: bool = False
    overwrite: bool = False
    shard: tuple[int, int] | None = None  # (index, count); None: SLURM array or 0/1
    tile: TileMode = "off"  # dense tasks on large images; (H, W): the tile size
    tile_overlap: int | None = None  # pixels; None: a quarter of the tile's shorter side
    stride: int = 1  # videos: every stride-th frame (index % stride == 0)
    start: str | None = None  # videos: first frame, a frame number or a time (video.parse_position)
    end: str | None = None  # videos: end (exclusive), same forms
    quiet: bool = False
    pose: PoseOptions = dataclasses.field(default_factory=PoseOptions)  # boxes, keypoint format, drawing
    command: tuple[str, ...] = ()  # argv, recorded in run.json

    @property
    def num_workers(self) -> int:
        return self.workers if self.workers is not None else min(8, max(2, os.cpu_count() or 2))


@dataclasses.dataclass(frozen=True)
class Work:
    """An item and the tasks it still needs."""

    item: Item
    tasks: tuple[str, ...]


def parse_input_size(text: str) -> tuple[int, int]:
    """``"1024x768"`` -> ``(1024, 768)`` (H, W)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise PlanError(f"--input-size {text!r}: expected HxW, e.g. 1024x768") from None
    if h <= 0 or w <= 0:
        raise PlanError(f"--input-size {text!r}: both sides must be positive")
    return h, w


def parse_tile(text: str) -> TileMode:
    """``"auto"``, ``"off"`` or ``"512x384"`` (the tile size, H x W)."""
    if text.lower() in ("auto", "off"):
        return text.lower()  # type: ignore[return-value]
    try:
        return parse_input_size(text)
    except PlanError:
        raise PlanError(f"--tile {text!r}: expected auto, off or HxW, e.g. 1024x768") from None


def check_options(options: PredictOptions, tasks: Sequence[str]) -> None:
    """The format, tiling and video options against the tasks that will run."""
    from sapiens2_cli.tasks import TASKS
    from sapiens2_cli.video import parse_position

    for name in tasks:
        task = TASKS[name]
        if options.fmt is not None and options.fmt not in task.formats:
            raise PlanError(f"--format {options.fmt}: {name} writes {' or '.join(task.formats)}")
        if isinstance(options.tile, tuple) and task.tile_rule is None:
            raise PlanError(f"--tile {options.tile[0]}x{options.tile[1]}: {name} cannot be tiled: {task.tile_refusal}")
    if options.tile_overlap is not None and options.tile_overlap < 0:
        raise PlanError(f"--tile-overlap {options.tile_overlap}: must be 0 or more pixels")
    positions = {}
    for flag, text in (("--start", options.start), ("--end", options.end)):
        try:
            positions[flag] = parse_position(text)
        except ValueError as err:
            raise PlanError(f"{flag}: {err}") from None
    start, end = positions["--start"], positions["--end"]
    if start and end and start[0] == end[0] and end[1] <= start[1]:
        raise PlanError(f"--end {options.end} is not after --start {options.start}")


def checkpoint_task(ref: str) -> str:
    """The task a checkpoint holds, read from its tensors (the Hub is asked when ``ref`` is remote)."""
    from sapiens2_cli.runtimes import artifact_format, load_artifact
    from sapiens2_cli.weights import describe, read_header, resolve

    if artifact_format(ref) in ("onnx", "pt2"):
        task = load_artifact(ref).task
    else:
        resolved = resolve(ref)
        task = describe(read_header(resolved.path), resolved.record).task
    if task not in TASK_NAMES:
        raise PlanError(f"{ref}: holds a {task} model; predict runs {', '.join(TASK_NAMES)}")
    return task


def model_refs(tasks: Sequence[str], checkpoints: Sequence[str], size: str) -> dict[str, str]:
    """Task -> model reference, in run order.

    ``--checkpoint REF`` serves the one requested task (or, with no ``--task``, the task its
    head holds); with several tasks each checkpoint is ``TASK=REF``. Tasks without a
    checkpoint use the zoo model ``<task>-<size>``.
    """
    explicit: dict[str, str] = {}
    bare: list[str] = []
    for text in checkpoints:
        name, sep, ref = text.partition("=")
        if sep and name in TASK_NAMES:
            if name in explicit:
                raise PlanError(f"two checkpoints given for {name}: {explicit[name]} and {ref}")
            explicit[name] = ref
        else:
            bare.append(text)
    wanted = list(dict.fromkeys(tasks))
    if len(bare) > 1:
        raise PlanError("several --checkpoint values without a task: write them as TASK=REF")
    if bare:
        if len(wanted) == 1 and wanted[0] not in explicit:
            explicit[wanted[0]] = bare[0]
        elif not wanted and not explicit:
            explicit[checkpoint_task(bare[0])] = bare[0]
        else:
            raise PlanError(f"--checkpoint {bare[0]}: with several tasks, name its task (TASK=REF)")
    if not wanted:
        wanted = list(explicit)
    if not wanted:
        raise PlanError(f"choose a task with -t/--task ({', '.join(TASK_NAMES)}) or give a --checkpoint")
    stray = [t for t in explicit if t not in wanted]
    if stray:
        raise PlanError(f"checkpoints given for {', '.join(stray)} but --task does not ask for it")
    refs = {}
    for task in wanted:
        if task in explicit:
            refs[task] = explicit[task]
            continue
        if size not in TASK_SIZES[task] or find_record(f"{task}-{size}") is None:
            raise PlanError(f"no {task} model of size {size} (sizes: {', '.join(TASK_SIZES[task])})")
        refs[task] = f"{task}-{size}"
    return refs


def pending_work(
    items: Sequence[Item], tasks: Sequence[str], *, output: Path, fmt: str | None, vis: bool, overwrite: bool
) -> tuple[list[Work], int]:
    """Items with the tasks whose files are not all present (all tasks with ``overwrite``),
    and the number of items with nothing left to do.

    Files are written atomically, so a present file is a complete one. Temporary files left
    by a killed run for these items are removed (this shard owns them).
    """
    from sapiens2_cli.tasks import TASKS
    from sapiens2_cli.writers import part_path

    specs = {t: TASKS[t].files(fmt, vis) for t in tasks}
    work, skipped = [], 0
    for item in items:
        if item.is_video:  # its frames are checked as they are decoded (sapiens2_cli.frames)
            work.append(Work(item, tuple(tasks)))
            continue
        todo = []
        for task in tasks:
            paths = [spec.path(output, task, item) for spec in specs[task]]
            for path in paths:
                _remove(part_path(path))
            if overwrite or not all(p.exists() for p in paths):
                todo.append(task)
        if todo:
            work.append(Work(item, tuple(todo)))
        else:
            skipped += 1
    return work, skipped


def _remove(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
