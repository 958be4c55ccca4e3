"""``sapiens2 export``: write a model as release-format safetensors, a pt2 program or ONNX, verified.

Every export is written into a scratch folder next to the output, loaded back with
``runtimes.load_artifact`` (onnxruntime for ONNX, ``torch.export.load`` for pt2, the strict
loader for safetensors), run on a random and a real input and compared with the float32 eager
model (``export_check``). Only an artifact within tolerance is moved into place, together with
``<output>.verify.json`` holding the measured differences; otherwise nothing is left behind and
``ExportCheckError`` reports the numbers.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from sapiens2_cli import __version__
from sapiens2_cli.artifact_meta import (
    OUTPUT_NAMES,
    ArtifactFormat,
    ArtifactInfo,
    DtypeName,
    build_metadata,
    default_labels,
    label_key,
)
from sapiens2_cli.export_check import CheckResult, check_inputs, compare, max_rel, perturb_ulp, tolerance_for
from sapiens2_cli.export_graph import (
    ONNX_DEFAULT_OPSET,
    ONNX_EXTERNAL_DATA_BYTES,
    ONNX_MIN_OPSET,
    GraphModule,
    dynamic_spatial,
    write_onnx,
    write_pt2,
)
from sapiens2_cli.models.sapiens2 import Sapiens2Model
from sapiens2_cli.runtimes import SUFFIX_FORMAT, ArtifactModel, load_artifact
from sapiens2_cli.weights import file_digest, load_model, save_model

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FORMATS: dict[str, str] = {fmt: suffix for suffix, fmt in SUFFIX_FORMAT.items()}  # format -> suffix
SIDECAR_SUFFIX = ".verify.json"


class ExportError(ValueError):
    """An export cannot be made as asked; the message names the reason."""


class ExportCheckError(ExportError):
    """The written artifact does not reproduce the eager model; it was removed."""


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """What an export wrote and measured."""

    path: Path
    files: tuple[Path, ...]  # the artifact and, for large ONNX graphs, its ``.data`` file
    sidecar: Path
    info: ArtifactInfo
    checks: tuple[CheckResult, ...]

    @property
    def max_abs(self) -> float:
        return max(d.max_abs for c in self.checks for d in c.outputs)

    @property
    def max_rel(self) -> float:
        return max(d.max_rel for c in self.checks for d in c.outputs)


def sidecar_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def resolve_format(output: Path, fmt: str | None) -> ArtifactFormat:
    """The format asked for, or the one the output suffix names; they must agree."""
    by_suffix = SUFFIX_FORMAT.get(output.suffix.lower())
    if fmt is None:
        if by_suffix is None:
            raise ExportError(f"{output}: pass --format or use a .safetensors, .pt2 or .onnx suffix")
        return by_suffix
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    if by_suffix != fmt:
        raise ExportError(f"{output}: a {fmt} artifact must end in {FORMATS[fmt]}")
    return fmt  # type: ignore[return-value]


def export_model(
    ref: str | os.PathLike,
    output: str | os.PathLike,
    *,
    fmt: ArtifactFormat | None = None,
    dtype: DtypeName = "fp32",
    input_size: tuple[int, int] | None = None,
    normalize_in_graph: bool = False,
    opset: int = ONNX_DEFAULT_OPSET,
    device: str | torch.device = "cpu",
    check_image: str | os.PathLike | None = None,
    tolerance: float | None = None,
    overwrite: bool = False,
    external_data_bytes: int = ONNX_EXTERNAL_DATA_BYTES,
    log: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export ``ref`` (zoo name, Hub repo or local safetensors) to ``output`` and verify it.

    Args:
        fmt: ``safetensors`` (release layout), ``pt2`` (``torch.export``) or ``onnx``; from the
            suffix of ``output`` when None.
        dtype: weights (and, for graphs, compute) dtype; RoPE stays bf16 arithmetic in all.
        input_size: ``(H, W)`` pixels the graph is traced and verified at (default: the
            checkpoint's); ONNX graphs are fixed to it, pt2 keeps H/W dynamic where the model allows.
        normalize_in_graph: graphs take RGB pixels 0-255 and normalise inside (pt2 / onnx).
        tolerance: a fixed limit on the max relative difference, instead of
            ``export_check.tolerance_for(dtype, noise floor)``.
        external_data_bytes: ONNX weights this large or larger go to ``<output>.data``.

    Raises:
        ExportError: an impossible request; ExportCheckError: the artifact failed its check.
        CheckpointError / HubError: from loading ``ref``.
    """
    say = log or (lambda _msg: None)
    output = Path(output)
    fmt = resolve_format(output, fmt)
    _check_request(
        output, fmt=fmt, dtype=dtype, opset=opset, normalize_in_graph=normalize_in_graph, overwrite=overwrite
    )

    device = torch.device(device)
    eager = load_model(ref, device=device)
    source = Path(eager.info.path)
    if output.resolve() == source.resolve():
        raise ExportError(f"{output}: is the source checkpoint itself; choose another output path")
    size = _input_size(eager, input_size)
    try:
        inputs = check_inputs(size, check_image)
    except FileNotFoundError as err:
        raise ExportError(str(err)) from err
    say(
        f"reference: {eager.task} model {eager.info.size or 'custom size'} from {source}, input {size[0]}x{size[1]}"
    )
    with torch.no_grad():
        try:
            want = {name: eager(x.to(device)) for name, (x, _) in inputs.items()}
        except ValueError as err:  # e.g. a pointmap head locked to another size
            hint = (
                " (a pointmap head runs only at the input size it was trained for)"
                if eager.task == "pointmap"
                else ""
            )
            raise ExportError(f"{source}: cannot run at {size[0]}x{size[1]}{hint}: {err}") from err

    metadata = build_metadata(
        task=eager.task, arch=eager.info.arch, head=eager.info.head, size=eager.info.size, input_size=size,
        artifact_format=fmt, dtype=dtype, normalize_in_graph=normalize_in_graph,
        dynamic_axes=dynamic_axes(fmt, eager), labels=_labels(eager),
        source=str(eager.info.source or ref), source_digest=file_digest(source),
    )  # fmt: skip
    if fmt == "onnx":
        metadata["onnx_opset"] = str(opset)
    model = eager if dtype == "fp32" else load_model(ref, device=device, dtype=DTYPES[dtype])
    graph = GraphModule(model, normalize_in_graph=normalize_in_graph).to(device).eval()
    floor = _noise_floor(eager, graph, inputs, want, device)
    limit = tolerance_for(dtype, floor) if tolerance is None else tolerance

    scratch = output.parent / f".{output.name}.export-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        target = scratch / output.name
        say(f"writing {fmt} ({dtype})...")
        example = torch.zeros(2, 3, *size, device=device)
        if fmt == "safetensors":
            save_model(eager, target, dtype=DTYPES[dtype], metadata=metadata)
        elif fmt == "pt2":
            write_pt2(graph, example, target, metadata=metadata)
        else:
            try:
                write_onnx(
                    graph,
                    example,
                    target,
                    metadata=metadata,
                    opset=opset,
                    external_data_bytes=external_data_bytes,
                )
            except ValueError as err:
                raise ExportError(f"{output}: {err}") from err
        artifact = load_artifact(target, device=_runtime_device(fmt, device))
        checks = tuple(_check(artifact, inputs, want, limit, normalize_in_graph))
        for check in checks:
            say(check.describe())
        if not all(c.passed for c in checks):
            lines = "\n  ".join(c.describe() for c in checks)
            raise ExportCheckError(
                f"{output}: the {fmt} artifact does not reproduce the eager model; removed it\n  {lines}"
            )
        files = tuple(sorted(scratch.iterdir()))
        report = _sidecar(output, files, artifact, metadata, checks, limit, floor, tolerance is not None)
        finals, sidecar = _install(files, output, report)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    info = dataclasses.replace(artifact.info, path=str(output))
    return ExportResult(output, tuple(finals), sidecar, info, checks)


def dynamic_axes(fmt: ArtifactFormat, model: Sapiens2Model) -> tuple[str, ...]:
    """Axes an artifact accepts at any size: ONNX fixes H/W (RoPE is baked in), pt2 and
    safetensors keep them free unless the model is size-locked (``dynamic_spatial``; the eager
    model also runs the 4K tokenizer at any multiple of its stride)."""
    free = {
        "onnx": False,
        "pt2": dynamic_spatial(model),
        "safetensors": model.task != "pointmap",
    }[fmt]
    return ("batch", "height", "width") if free else ("batch",)


def _check_request(
    output: Path, *, fmt: ArtifactFormat, dtype: str, opset: int, normalize_in_graph: bool, overwrite: bool
) -> None:
    """Refuse what cannot be made before anything is loaded."""
    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    if fmt == "onnx":
        if dtype == "bf16":
            raise ExportError(
                "onnxruntime has no bfloat16 arithmetic kernels on CPU, so a bf16 ONNX graph cannot be "
                "verified; export fp32 (TensorRT can build a bf16 engine from it) or fp16"
            )
        missing = [m for m in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(m) is None]
        if missing:
            raise ExportError(f"ONNX export needs {', '.join(missing)}: pip install 'sapiens2[export]'")
        if opset < ONNX_MIN_OPSET:
            raise ExportError(f"ONNX opset {opset} is too old; use {ONNX_MIN_OPSET} or newer")
    if normalize_in_graph and fmt == "safetensors":
        raise ExportError("--normalize-in-graph applies to pt2 and onnx graphs, not to safetensors weights")
    if output.exists() and not overwrite:
        raise ExportError(f"{output}: already exists (pass --overwrite to replace it)")


def _labels(model: Sapiens2Model) -> tuple[str, ...]:
    """Class / keypoint names: the checkpoint's own metadata first, else the packaged tables."""
    key = label_key(model.task)
    if key and key in model.info.metadata:
        return tuple(json.loads(model.info.metadata[key]))
    return default_labels(model.task, model.info.head.out_channels if model.info.head is not None else 0)


def _noise_floor(eager: Sapiens2Model, graph: GraphModule, inputs, want, device: torch.device) -> float:
    """fp32: the eager model's response to 1-ulp input noise; bf16/fp16: what running the eager
    model in that dtype costs. Both as the worst ``max_rel`` over the check inputs."""
    with torch.no_grad():
        if graph.dtype == torch.float32:
            return max(max_rel(eager(perturb_ulp(x).to(device)), want[n]) for n, (x, _) in inputs.items())
        return max(max_rel(graph.model(x.to(device, graph.dtype)), want[n]) for n, (x, _) in inputs.items())


def _install(files: tuple[Path, ...], output: Path, report: dict) -> tuple[tuple[Path, ...], Path]:
    """Move the verified files next to ``output`` and write the sidecar; drop a stale ``.data``."""
    stale = output.with_name(output.name + ".data")
    if output.exists() and stale.exists() and stale.name not in {f.name for f in files}:
        stale.unlink()
    finals = []
    for f in files:
        os.replace(f, output.parent / f.name)
        finals.append(output.parent / f.name)
    sidecar = sidecar_path(output)
    tmp = files[0].with_name(sidecar.name)
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, sidecar)
    return tuple(finals), sidecar


def _input_size(model: Sapiens2Model, size: tuple[int, int] | None) -> tuple[int, int]:
    size = tuple(size) if size is not None else tuple(model.info.input_size)
    stride = model.backbone.arch.stride
    if len(size) != 2 or any(s <= 0 or s % stride for s in size):
        raise ExportError(
            f"input size {size[0]}x{size[1]} must be positive multiples of {stride} pixels for this model"
        )
    return size  # type: ignore[return-value]


def _runtime_device(fmt: str, device: torch.device) -> torch.device:
    if fmt == "onnx" and device.type == "cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return torch.device("cpu")  # verify on CPU rather than fail
    return device


def _check(artifact: ArtifactModel, inputs, want, tolerance: float, normalize_in_graph: bool):
    names = OUTPUT_NAMES[artifact.task]
    for name, (x, pixels) in inputs.items():
        # the real photo enters as pixels when the graph normalises, exercising that path
        got = artifact.run(pixels) if normalize_in_graph and name == "real" else artifact(x)
        yield compare(name, tuple(x.shape), got, want[name], names, tolerance)


def _sidecar(
    output: Path,
    files,
    artifact: ArtifactModel,
    metadata,
    checks,
    tolerance: float,
    floor: float,
    fixed: bool,
) -> dict:
    runtime = f"torch {torch.__version__}"
    if artifact.info.format == "onnx":
        import onnxruntime as ort

        runtime = f"onnxruntime {ort.__version__} ({', '.join(artifact.session.get_providers())})"
    return {
        "artifact": output.name,
        "files": [f.name for f in files],
        "artifact_digest": file_digest(next(f for f in files if f.name == output.name)),
        "format": artifact.info.format,
        "dtype": artifact.info.dtype,
        "input_size": list(artifact.info.input_size),
        "dynamic_axes": list(artifact.info.dynamic_axes),
        "normalize_in_graph": artifact.info.normalize_in_graph,
        "source": metadata["source"],
        "source_digest": metadata["source_digest"],
        "metric": "max |artifact - eager float32| / max |eager float32|, per output",
        "tolerance": tolerance,
        "tolerance_rule": "given on the command line"
        if fixed
        else "max(base for the dtype, factor * noise_floor)",
        "noise_floor": floor,
        "max_abs_diff": max(d.max_abs for c in checks for d in c.outputs),
        "max_rel_diff": max(d.max_rel for c in checks for d in c.outputs),
        "passed": True,
        "checks": [c.to_dict() for c in checks],
        "runtime": runtime,
        "exporter": f"sapiens2 {__version__}, torch {torch.__version__}",
    }
