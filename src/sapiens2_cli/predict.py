"""``sapiens2 predict``: a pure tensor step (:class:`Predictor`) wrapped by an I/O run loop.

The loop overlaps everything that is not the model with the model: worker threads read,
decode and pre-process images ahead (:func:`readers.prefetch`), the main thread batches model
inputs of any images (they all have the model's input size) and runs the model, and writer
threads post-process each image on the model's device, render and write its files
(:mod:`sapiens2_cli.engine`). Each image is decoded once for all tasks. Videos are decoded on
a thread of their own (:mod:`sapiens2_cli.frames`) and their frames flow through the same
loop; large images may be cut into tiles (:mod:`sapiens2_cli.tasks.tiled`).

Bad inputs and failing items are recorded and reported one line each; the others go on.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any, TextIO

import torch

from sapiens2_cli import plan as planning
from sapiens2_cli import sources
from sapiens2_cli.engine import Runner
from sapiens2_cli.plan import PlanError, PredictOptions
from sapiens2_cli.progress import Progress
from sapiens2_cli.runinfo import Digests, Failure, RunRecord, run_file_name, write_run_json
from sapiens2_cli.sources import Item
from sapiens2_cli.tasks import TASKS
from sapiens2_cli.tasks.base import ModelInput, Raw, Task
from sapiens2_cli.tasks.pose_options import PoseOptions
from sapiens2_cli.tasks.tiled import Tiler, make_tiler
from sapiens2_cli.transforms import normalize
from sapiens2_cli.writers import PART_SUFFIX, write_file

LAYOUT_VERSION = 1  # the output tree documented in the README
STALE_PART_S = 600.0
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA, else MPS, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; unavailable is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise PlanError(f"--device {name!r}: expected auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise PlanError(f"--device {name}: CUDA is not available (torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise PlanError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise PlanError("--device mps: MPS is not available")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise PlanError(f"--device {name}: expected auto, cpu, cuda, cuda:N or mps")
    return device


def _float32(raw: Raw) -> Raw:
    return tuple(r.float() for r in raw) if isinstance(raw, tuple) else raw.float()


class Predictor:
    """One task's model as a pure step: uint8 BGR pixels ``[B, H_in, W_in, 3]`` -> raw outputs.

    Normalisation runs on the model's device. The forward runs under ``inference_mode`` and,
    for ``bf16`` / ``fp16``, autocast (weights stay float32; norms and the bf16 RoPE keep their
    own precision). Outputs are cast to float32, batch-first (seg ``[B, 29, H, W]``, pose
    ``[B, 308, H/4, W/4]``, normal / albedo ``[B, 3, H, W]``, pointmap ``([B, 3, H, W], [B, 1])``). With ``compile`` the model is
    compiled for a static batch: short batches are zero-padded to ``batch_size``.
    """

    def __init__(
        self, model: torch.nn.Module, task: Task, *, device: torch.device, precision: str = "fp32",
        compile: bool = False, batch_size: int = 1,
    ) -> None:  # fmt: skip
        self.model = model
        self.task = task
        self.device = device
        self.autocast_dtype = AUTOCAST_DTYPES[precision]
        self.static_batch = batch_size if compile else None
        if compile:
            from sapiens2_cli.models.compiled import compile_model

            self._forward = compile_model(model)  # keeps the official bf16 RoPE rounding
        else:
            self._forward = model

    @torch.inference_mode()
    def __call__(self, pixels: torch.Tensor) -> Raw:
        n = pixels.shape[0]
        if self.static_batch is not None and n < self.static_batch:
            pad = pixels.new_zeros((self.static_batch - n, *pixels.shape[1:]))
            pixels = torch.cat([pixels, pad])
        if self.device.type == "cuda" and not pixels.is_cuda:
            pixels = pixels.pin_memory()
        x = normalize(pixels.to(self.device, non_blocking=True))  # [B, 3, H, W] float32
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None), warnings.catch_warnings():  # fmt: skip
            # Under autocast the float32 RMSNorm weights meet bf16 / fp16 activations, which
            # only costs the fused kernel; torch warns about it on every call site.
            warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")
            raw = self.task.forward(self._forward, x)
        raw = _float32(raw)
        return tuple(r[:n] for r in raw) if isinstance(raw, tuple) else raw[:n]


def open_model(ref: str, *, task: str, device: torch.device):  # noqa: ANN201 - model or artifact
    """Our model for a checkpoint reference, or an exported ``.onnx`` / ``.pt2`` run by its runtime."""
    from sapiens2_cli.runtimes import artifact_format, load_artifact
    from sapiens2_cli.weights import load_model

    if artifact_format(ref) in ("onnx", "pt2"):
        return load_artifact(ref, device=device, task=task)
    return load_model(ref, task=task, device=device)


@dataclasses.dataclass
class LoadedTask:
    """A task ready to run: its model, predictor, input size, tiler and where its model came from."""

    task: Task
    predictor: Predictor
    input_hw: tuple[int, int]
    model_info: dict[str, Any]
    tiler: Tiler | None = None

    def prepare_item(self, image: Any, item: Item) -> list[ModelInput] | None:
        """Model inputs of the ``[H, W, 3]`` uint8 BGR image of ``item``: its tiles when it is
        tiled; ``None`` when they wait for the task's detector (:meth:`Task.prepare_item`)."""
        if self.tiler is not None and self.tiler.applies(image.shape[:2]):
            return self.tiler.prepare(image)
        return self.task.prepare_item(image, self.input_hw, item)


def configure_tasks(options: PredictOptions, refs: dict[str, str]) -> dict[str, Task]:
    """Each requested task set up with this run's options (no model is loaded yet)."""
    if "pose" not in refs and options.pose != PoseOptions():
        raise PlanError("pose options (--bboxes, --detector, --keypoint-format...) given but -t pose is not run")
    return {name: TASKS[name].configure(options, model_ref=ref) for name, ref in refs.items()}


def load_tasks(
    options: PredictOptions, tasks: dict[str, Task], refs: dict[str, str], device: torch.device
) -> dict[str, LoadedTask]:
    """Load each task's model (and helpers such as the person detector) and check that it runs
    at the requested input size."""
    loaded = {}
    for name, ref in refs.items():
        model = open_model(ref, task=name, device=device)
        task = tasks[name].for_model(model)
        input_hw = options.input_size or tuple(model.info.input_size)
        try:
            task.check_input_size(model, input_hw)
            tiler = make_tiler(task.tile_rule, options.tile, options.tile_overlap, input_hw)
            if tiler is not None and tiler.tile_hw != input_hw:
                task.check_input_size(model, tiler.tile_hw)
        except ValueError as err:
            raise PlanError(f"{ref}: {err}") from None
        task.load_helpers(device)
        predictor = Predictor(
            model, task, device=device, precision=options.precision,
            compile=options.compile, batch_size=options.batch_size,
        )  # fmt: skip
        info = model.info
        loaded[name] = LoadedTask(task, predictor, input_hw, {
            "reference": ref, "path": info.path, "size": info.size,
            "format": getattr(info, "format", "safetensors"),
            "input_size_hw": list(input_hw), "model_input_size_hw": list(info.input_size),
            "embed_dims": info.arch.embed_dims if info.arch else None,
            "num_layers": info.arch.num_layers if info.arch else None,
            "tiling": tiler.describe() if tiler is not None else None,
        }, tiler)  # fmt: skip
    return loaded


def check_run_files(output: Path, tasks: dict[str, Task], *, overwrite: bool) -> None:
    """Refuse to add to an output folder whose per-task files (``OUT/pose/keypoints.json``...)
    another configuration wrote, unless ``overwrite``: its existing outputs would not match them."""
    for name, task in tasks.items():
        for filename, content in task.run_files().items():
            path = output / name / filename
            try:
                existing = json.loads(path.read_text("utf-8"))
            except (OSError, ValueError):
                continue  # absent or unreadable: rewritten
            if existing != content.data and not overwrite:
                raise PlanError(
                    f"{path} was written by a run with other settings (e.g. another --keypoint-format); "
                    "choose another output folder or redo everything with --overwrite"
                )


def write_run_files(output: Path, tasks: dict[str, Task]) -> None:
    """Per-task files written once (``OUT/seg/classes.json``); kept when already identical.

    Shards may write them at the same moment, so each writer uses its own temporary name;
    such temporaries older than :data:`STALE_PART_S` can only come from a killed run and go.
    """
    for name, task in tasks.items():
        for filename, content in task.run_files().items():
            path = output / name / filename
            for stale in path.parent.glob(f".{filename}.*{PART_SUFFIX}"):
                if time.time() - stale.stat().st_mtime > STALE_PART_S:
                    stale.unlink(missing_ok=True)
            if path.is_file():
                try:
                    if json.loads(path.read_text("utf-8")) == content.data:
                        continue
                except (OSError, ValueError):
                    pass
            write_file(path, content, unique_temp=True)


def run_predict(options: PredictOptions, *, stdin: TextIO | None = None) -> RunRecord:
    """Run ``sapiens2 predict`` as configured; returns what happened (also in ``run.json``).

    Raises:
        PlanError, sources.SourceError, weights.CheckpointError: usage errors, before anything runs.
    """
    started = time.time()
    refs = planning.model_refs(options.tasks, options.checkpoints, options.size)
    planning.check_options(options, list(refs))
    tasks = configure_tasks(options, refs)
    output = Path(options.output)
    collection = sources.collect(options.inputs, recursive=options.recursive, stdin=stdin)
    sources.check_output_dir(output, collection)
    check_run_files(output, tasks, overwrite=options.overwrite)
    if not collection.items and not collection.problems:
        raise PlanError("no image or video found in the inputs (" + ", ".join(options.inputs) + ")")
    shard = options.shard or sources.shard_from_env(os.environ) or (0, 1)
    items = sources.shard(collection.items, *shard)
    work, skipped = planning.pending_work(
        items, list(refs), output=output, fmt=options.fmt, vis=options.vis, overwrite=options.overwrite
    )
    device = resolve_device(options.device)

    videos = sum(item.is_video for item in items)  # their frames are counted as they are decoded
    record = RunRecord(tuple(refs), total=len(items) - videos + len(collection.problems), started=started)
    record.skipped = skipped
    for name in refs:
        record.per_task[name]["skipped"] = len(items) - videos - sum(name in w.tasks for w in work if not w.item.is_video)
    t0 = time.perf_counter()
    loaded = load_tasks(options, tasks, refs, device) if work else {}
    record.timings["load_models"] = time.perf_counter() - t0
    digests = Digests({n: lt.model_info["path"] for n, lt in loaded.items()})
    output.mkdir(parents=True, exist_ok=True)
    write_run_files(output, {n: loaded[n].task if n in loaded else tasks[n] for n in refs})

    with Progress(record.total, quiet=options.quiet) as progress:
        for problem in collection.problems:
            failure = Failure(problem.input, problem.reason)
            record.failures.append(failure)
            record.failed += 1
            progress.error(failure.line())
            progress.advance(failed=1)
        progress.advance(skipped=skipped)
        runner = Runner(loaded, record, progress, options=options)
        try:
            runner.run(work)
        except KeyboardInterrupt:
            record.status = "interrupted"
        except BaseException:
            record.status = "crashed"
            raise
        finally:
            models = {n: {**lt.model_info, "digest": None} for n, lt in loaded.items()}
            for name, digest in digests.get().items():
                models[name]["digest"] = digest
            for name in refs:
                models.setdefault(name, {"reference": refs[name], "loaded": False})
            opts = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(options).items()}
            opts["device_resolved"] = str(device)
            opts["shard"] = list(shard)
            write_run_json(output / run_file_name(shard), record.to_json(
                options=opts, models=models, extra={"layout_version": LAYOUT_VERSION},
            ))  # fmt: skip
    return record

