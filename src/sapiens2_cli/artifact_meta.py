"""What an exported artifact says about itself: the ``sapiens2.*`` metadata strings.

Every artifact ``sapiens2 export`` writes (safetensors header, ONNX ``metadata_props``, pt2
extra file ``sapiens2.json``) carries the same flat ``str -> str`` table, so a runtime can use
the artifact without the model code: task, input size ``HxW`` (pixels), input and output
names, whether normalisation is inside the graph (and with which mean/std, RGB, 0-255 scale),
which axes are dynamic, the class or keypoint names, and the digest of the source checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from importlib import resources
from typing import Literal

from sapiens2_cli import __version__
from sapiens2_cli.models.arch import BackboneArch
from sapiens2_cli.models.heads import HeadConfig
from sapiens2_cli.weights import FORMAT_VERSION, META_PREFIX, CheckpointError

ArtifactFormat = Literal["safetensors", "pt2", "onnx"]
DtypeName = Literal["fp32", "bf16", "fp16"]

INPUT_NAME = "image"
OUTPUT_NAMES: dict[str, tuple[str, ...]] = {
    "pretrain": ("features",),
    "seg": ("logits",),
    "pose": ("heatmaps",),
    "normal": ("normal",),
    "albedo": ("albedo",),
    "pointmap": ("pointmap", "scale"),
}
# The release's pixel normalisation: RGB order, 0-255 scale.
MEAN_RGB = (123.675, 116.28, 103.53)
STD_RGB = (58.395, 57.12, 57.375)
PT2_EXTRA_FILE = "sapiens2.json"


@dataclasses.dataclass(frozen=True)
class ArtifactInfo:
    """An artifact's description; the fields shared with ``ModelInfo`` mean the same thing."""

    task: str
    arch: BackboneArch | None
    head: HeadConfig | None
    input_size: tuple[int, int]  # H, W pixels the artifact was exported (and verified) at
    format: ArtifactFormat
    dtype: DtypeName
    output_names: tuple[str, ...]
    normalize_in_graph: bool  # True: the graph takes RGB pixels 0-255, not normalised input
    dynamic_axes: tuple[str, ...]  # subset of ("batch", "height", "width")
    labels: tuple[str, ...] = ()  # seg class names / pose keypoint names, by channel
    size: str | None = None
    source: str = ""  # the reference the artifact was exported from
    source_digest: str = ""  # ``sha256:<hex>`` of the source checkpoint
    path: str = ""  # the artifact file
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)  # the raw table, prefix stripped


def default_labels(task: str, channels: int) -> tuple[str, ...]:
    """Packaged seg class / pose keypoint names when the head has the released channel count."""
    table = {"seg": ("seg29_classes.json", "classes"), "pose": ("keypoints308.json", "keypoints")}.get(task)
    if table is None:
        return ()
    name, field = table
    entries = json.loads(resources.files("sapiens2_cli").joinpath("data", name).read_text())[field]
    return tuple(e["name"] for e in entries) if len(entries) == channels else ()


def label_key(task: str) -> str | None:
    return {"seg": "class_names", "pose": "keypoint_names"}.get(task)


def build_metadata(
    *,
    task: str,
    arch: BackboneArch,
    head: HeadConfig | None,
    size: str | None,
    input_size: tuple[int, int],
    artifact_format: ArtifactFormat,
    dtype: DtypeName,
    normalize_in_graph: bool,
    dynamic_axes: tuple[str, ...],
    labels: tuple[str, ...],
    source: str,
    source_digest: str,
) -> dict[str, str]:
    """The metadata table, keys without the ``sapiens2.`` prefix (see ``with_prefix``)."""
    meta = {
        "format_version": FORMAT_VERSION,
        "task": task,
        "arch": json.dumps(arch.to_dict()),
        "input_size": f"{input_size[0]}x{input_size[1]}",
        "artifact_format": artifact_format,
        "dtype": dtype,
        "input_name": INPUT_NAME,
        "output_names": json.dumps(list(OUTPUT_NAMES[task])),
        "normalize_in_graph": "true" if normalize_in_graph else "false",
        "mean_rgb": json.dumps(list(MEAN_RGB)),
        "std_rgb": json.dumps(list(STD_RGB)),
        "dynamic_axes": json.dumps(list(dynamic_axes)),
        "source": source,
        "source_digest": source_digest,
        "exporter": f"sapiens2 {__version__}",
    }
    if head is not None:
        meta["head"] = json.dumps(head.to_dict())
    if size:
        meta["size"] = size
    key = label_key(task)
    if key and labels:
        meta[key] = json.dumps(list(labels))
    return meta


def with_prefix(meta: Mapping[str, str]) -> dict[str, str]:
    return {META_PREFIX + k: v for k, v in meta.items()}


def strip_prefix(meta: Mapping[str, str]) -> dict[str, str]:
    return {k[len(META_PREFIX) :]: v for k, v in meta.items() if k.startswith(META_PREFIX)}


def parse_metadata(path: str, meta: Mapping[str, str], *, artifact_format: ArtifactFormat) -> ArtifactInfo:
    """Read the table back (keys without prefix); a missing or malformed entry names the file."""
    required = (
        "task",
        "arch",
        "input_size",
        "artifact_format",
        "dtype",
        "output_names",
        "normalize_in_graph",
    )
    missing = [k for k in required if k not in meta]
    if missing:
        raise CheckpointError(
            f"{path}: no sapiens2 metadata ({', '.join(META_PREFIX + k for k in missing)} missing); "
            "only artifacts written by `sapiens2 export` can be run"
        )
    if meta["artifact_format"] != artifact_format:
        raise CheckpointError(
            f"{path}: metadata says it is a {meta['artifact_format']} artifact but the file is {artifact_format}"
        )
    try:
        h, w = (int(v) for v in meta["input_size"].lower().split("x"))
        task = meta["task"]
        outputs = tuple(json.loads(meta["output_names"]))
        arch = BackboneArch.from_dict(json.loads(meta["arch"]))
        head = HeadConfig.from_dict(json.loads(meta["head"])) if "head" in meta else None
        key = label_key(task)
        labels = tuple(json.loads(meta[key])) if key and key in meta else ()
        dynamic = tuple(json.loads(meta.get("dynamic_axes", "[]")))
    except (ValueError, TypeError, KeyError) as err:
        raise CheckpointError(f"{path}: malformed sapiens2 metadata ({err})") from err
    if task not in OUTPUT_NAMES or outputs != OUTPUT_NAMES[task]:
        raise CheckpointError(f"{path}: metadata task {task!r} does not go with outputs {list(outputs)}")
    if meta["dtype"] not in ("fp32", "bf16", "fp16"):
        raise CheckpointError(f"{path}: unknown dtype {meta['dtype']!r} in the metadata")
    return ArtifactInfo(
        task=task,
        arch=arch,
        head=head,
        input_size=(h, w),
        format=artifact_format,
        dtype=meta["dtype"],  # type: ignore[arg-type]
        output_names=outputs,
        normalize_in_graph=meta["normalize_in_graph"] == "true",
        dynamic_axes=dynamic,
        labels=labels,
        size=meta.get("size"),
        source=meta.get("source", ""),
        source_digest=meta.get("source_digest", ""),
        path=path,
        metadata=dict(meta),
    )
