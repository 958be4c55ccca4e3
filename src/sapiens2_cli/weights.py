"""Resolve a model reference, read its safetensors, infer the architecture, load strictly.

A reference is a zoo name (``seg-0.4b``), a Hub repo id (``facebook/sapiens2-seg-1b``, optionally
``@revision``), or a local ``.safetensors`` path. Two layouts are accepted, the released ones:
a bare backbone state dict (pretrain files) and ``backbone.* + decode_head.*`` (task files).
The architecture and head come from the tensor shapes, so fine-tuned, exported and tiny
checkpoints load with no config. Loading is strict: a missing, unexpected or mis-shaped key is
an error that names it. Models are built on the meta device and materialised from the file,
so no random copy of a large model is ever allocated.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from sapiens2_cli.hub import hub_file
from sapiens2_cli.models.arch import BackboneArch, infer_arch, size_name
from sapiens2_cli.models.heads import HeadConfig, infer_head
from sapiens2_cli.models.rope import ROPE_DTYPE, rope_periods
from sapiens2_cli.models.sapiens2 import DEFAULT_INPUT_SIZE, TASK_NAMES, ModelInfo, Sapiens2Model
from sapiens2_cli.models.zoo import ZooRecord, find_record

PERIODS_KEY = "rope_embed.periods"
META_PREFIX = "sapiens2."
FORMAT_VERSION = "1"


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the file and the reason."""


@dataclasses.dataclass(frozen=True)
class Resolved:
    """A reference resolved to a local file."""

    path: Path
    source: str
    record: ZooRecord | None = None


@dataclasses.dataclass(frozen=True)
class Header:
    """What a safetensors header says: key -> shape, key -> dtype, and the metadata strings."""

    path: Path
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    metadata: dict[str, str]


# --------------------------------------------------------------------------- references

def resolve(ref: str | os.PathLike) -> Resolved:
    """Turn a reference into a local file, downloading through the HF cache when needed."""
    text = os.fspath(ref)
    path = Path(text).expanduser()
    if path.is_file():
        return Resolved(path, text)
    if path.suffix in (".safetensors", ".pt2", ".onnx", ".pth") or path.is_dir():
        raise CheckpointError(f"{text}: no such checkpoint file")
    name, _, revision = text.partition("@")
    record = find_record(name)
    if record is not None:
        repo_id, filename = record.repo_id, record.filename
    elif name.count("/") == 1:
        repo_id, filename = name, _single_safetensors(name, revision or None)
    else:
        raise CheckpointError(
            f"{text!r} is neither a local file, a zoo name (see `sapiens2 models`) "
            "nor a Hub repo id such as facebook/sapiens2-seg-1b"
        )
    if record is not None and not record.listed:
        try:
            return Resolved(hub_file(repo_id, filename, revision=revision or None), text, record)
        except Exception as err:  # noqa: BLE001 - rephrased: these weights may not exist
            raise CheckpointError(
                f"{record.name}: no {record.task} weights are published in the official model "
                f"zoo ({err}); pass a local checkpoint with --checkpoint"
            ) from err
    return Resolved(hub_file(repo_id, filename, revision=revision or None), text, record)


def _single_safetensors(repo_id: str, revision: str | None) -> str:
    """The one ``.safetensors`` file of an arbitrary Hub model repo."""
    from huggingface_hub import snapshot_download

    from sapiens2_cli.hub import HubError

    try:
        folder = Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=["*.safetensors", "*.json"])
        )
    except Exception as err:  # noqa: BLE001 - re-raised with the repo named
        raise HubError(
            f"{repo_id}: could not list the repository's safetensors files ({err}); "
            "download it with `sapiens2 download` on a machine with network access"
        ) from err
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.safetensors"))
    if len(files) != 1:
        raise CheckpointError(
            f"{repo_id}: expected exactly one .safetensors file, found {files or 'none'}; "
            "pass the file path instead"
        )
    return files[0]


# --------------------------------------------------------------------------- headers and layouts

def read_header(path: str | os.PathLike) -> Header:
    """Read key names, shapes, dtypes and metadata of a safetensors file without loading tensors."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
            shapes, dtypes = {}, {}
            for key in f.keys():
                sl = f.get_slice(key)
                shapes[key] = tuple(sl.get_shape())
                dtypes[key] = sl.get_dtype()
    except Exception as err:  # noqa: BLE001 - any parse failure means "not a safetensors file"
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err
    return Header(path, shapes, dtypes, metadata)


def split_layout(header: Header) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]] | None]:
    """Backbone shapes (no prefix) and head shapes (no prefix, None for a pretrain file)."""
    shapes = header.shapes
    if any(k.startswith("backbone.") for k in shapes):
        backbone = {k[9:]: s for k, s in shapes.items() if k.startswith("backbone.")}
        head = {k[12:]: s for k, s in shapes.items() if k.startswith("decode_head.")}
        stray = [k for k in shapes if not k.startswith(("backbone.", "decode_head."))]
        if stray:
            raise CheckpointError(
                f"{header.path}: unexpected keys outside backbone./decode_head.: {_names(stray)}"
            )
        return backbone, head or None
    if "cls_token" in shapes:
        return dict(shapes), None
    raise CheckpointError(
        f"{header.path}: not a Sapiens2 checkpoint (no 'cls_token' or 'backbone.cls_token'; "
        f"first keys: {_names(sorted(shapes)[:5])})"
    )


def _names(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def describe(header: Header, record: ZooRecord | None = None) -> ModelInfo:
    """Infer task, backbone architecture, head and input size from a header."""
    backbone, head = split_layout(header)
    try:
        arch = infer_arch(backbone)
        head_cfg = infer_head(head) if head is not None else None
    except KeyError as err:
        raise CheckpointError(f"{header.path}: missing key {err.args[0]!r} (cannot infer the model)") from err
    meta = {k[len(META_PREFIX):]: v for k, v in header.metadata.items() if k.startswith(META_PREFIX)}
    task = head_cfg.task if head_cfg is not None else "pretrain"
    if "task" in meta and meta["task"] != task:
        raise CheckpointError(f"{header.path}: metadata says task {meta['task']!r} but the tensors hold {task!r}")
    input_size = record.input_size if record is not None else DEFAULT_INPUT_SIZE
    if "input_size" in meta:
        h, w = meta["input_size"].lower().split("x")
        input_size = (int(h), int(w))
    return ModelInfo(
        task=task,
        arch=arch,
        head=head_cfg,
        input_size=input_size,
        size=size_name(arch),
        path=str(header.path),
        metadata=meta,
    )


# --------------------------------------------------------------------------- loading

def file_key(model_key: str, *, bare: bool) -> str:
    """The checkpoint key of a model parameter: pretrain files (``bare``) have no ``backbone.`` prefix."""
    return model_key[len("backbone."):] if bare else model_key


def build_meta(info: ModelInfo) -> Sapiens2Model:
    """The model of ``info`` with every tensor on the meta device (no memory allocated)."""
    with torch.device("meta"):
        return Sapiens2Model(info.task, info.arch, info.head)


def check_keys(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]], path: Path) -> None:
    """Strict key check; the periods buffer alone may be absent (it is re-derivable)."""
    missing = sorted(k for k in expected if k not in found and not k.endswith(PERIODS_KEY))
    unexpected = sorted(k for k in found if k not in expected)
    mis_shaped = sorted(
        f"{k} (file {list(found[k])}, model {list(s)})"
        for k, s in expected.items()
        if k in found and tuple(found[k]) != tuple(s)
    )
    problems = []
    if missing:
        problems.append(f"missing keys: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_names(unexpected)}")
    if mis_shaped:
        problems.append(f"mis-shaped keys: {_names(mis_shaped)}")
    if problems:
        raise CheckpointError(f"{path}: does not match the model it describes; " + "; ".join(problems))


def load_model(
    ref: str | os.PathLike,
    *,
    task: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    fuse_qkv: bool = True,
) -> Sapiens2Model:
    """Load a Sapiens2 model strictly from a zoo name, Hub repo id or local safetensors file.

    Args:
        ref: ``"seg-0.4b"``, ``"facebook/sapiens2-pose-1b@main"`` or ``"path/to/model.safetensors"``.
        task: the expected task; an error if the checkpoint holds another. ``"pretrain"`` on a task
            checkpoint loads its backbone only.
        device: where the weights are materialised (``"cpu"``, ``"cuda:0"``, ``"mps"``...).
        dtype: parameter dtype (fp32, bf16 or fp16); the RoPE periods always stay bf16.
        fuse_qkv: build one q/k/v projection per attention layer (``Sapiens2Model.fuse_qkv``),
            the faster layout for inference; ``state_dict()`` keeps the released keys.

    Returns:
        The model in eval mode, with ``.task``, ``.backbone``, ``.decode_head`` and ``.info``.
    """
    from safetensors import safe_open

    resolved = resolve(ref)
    header = read_header(resolved.path)
    info = dataclasses.replace(describe(header, resolved.record), source=resolved.source)
    if task is not None and task != info.task:
        if task not in TASK_NAMES:
            raise CheckpointError(f"unknown task {task!r}; choose from {', '.join(TASK_NAMES)}")
        if task != "pretrain":
            raise CheckpointError(f"{resolved.path}: holds a {info.task} model, not {task}")
        info = dataclasses.replace(info, task="pretrain", head=None)
    model = build_meta(info)
    bare = "cls_token" in header.shapes
    expected = {file_key(k, bare=bare): tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: s for k, s in header.shapes.items() if info.task != "pretrain" or not k.startswith("decode_head.")}
    check_keys(expected, found, resolved.path)

    device = torch.device(device)
    state: dict[str, torch.Tensor] = {}
    views: list[str] = []  # tensors still backed by the file's memory map
    copied = 0  # tensors read from the file and converted (or moved to another device)
    with safe_open(resolved.path, framework="pt", device="cpu") as f:
        for model_key in model.state_dict():
            key = file_key(model_key, bare=bare)
            if key not in found:  # the periods buffer only (check_keys allows nothing else)
                tensor = rope_periods(info.arch.head_dim, info.arch.rope_base)
            else:
                tensor = f.get_tensor(key)
            target = ROPE_DTYPE if key.endswith(PERIODS_KEY) else dtype
            state[model_key] = loaded = tensor.to(device=device, dtype=target)
            if key in found:
                if loaded is tensor:
                    views.append(model_key)
                else:
                    copied += 1
        del tensor
    if copied:
        # Every view shares one mapping of the whole file: a single bf16 periods buffer left as a
        # view of a float32 file loaded as bf16 would keep all of the file's pages mapped (and
        # counted in the resident memory) for the model's lifetime. A fully zero-copy load
        # (the file's dtype on the CPU) keeps its views; a converting one copies the few left.
        for model_key in views:
            state[model_key] = state[model_key].clone()
    model.load_state_dict(state, strict=True, assign=True)
    del state  # the unfused q/k/v tensors are freed as each layer is fused
    if fuse_qkv:
        model.fuse_qkv()
    model.info = info
    return model.eval()


# --------------------------------------------------------------------------- saving and digests

def release_state_dict(model: Sapiens2Model, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's tensors under the released key names (periods kept bf16), contiguous, on CPU."""
    out = {}
    for key, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu")
        if dtype is not None and t.is_floating_point() and not key.endswith(PERIODS_KEY):
            t = t.to(dtype)
        out[file_key(key, bare=model.task == "pretrain")] = t.contiguous()
    return out


def model_metadata(model: Sapiens2Model, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Our own safetensors metadata: task, architecture, head and input size (all strings)."""
    info = model.info
    meta = {
        "format": "pt",
        META_PREFIX + "format_version": FORMAT_VERSION,
        META_PREFIX + "task": model.task,
        META_PREFIX + "arch": json.dumps(model.backbone.arch.to_dict()),
    }
    if model.decode_head is not None and info is not None and info.head is not None:
        meta[META_PREFIX + "head"] = json.dumps(info.head.to_dict())
    if info is not None:
        meta[META_PREFIX + "input_size"] = f"{info.input_size[0]}x{info.input_size[1]}"
    for k, v in (extra or {}).items():
        meta[META_PREFIX + k] = str(v)
    return meta


def save_model(
    model: Sapiens2Model,
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``model`` in the released layout with our metadata, atomically (temp file + rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(release_state_dict(model, dtype), str(tmp), metadata=model_metadata(model, metadata))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def file_digest(path: str | os.PathLike) -> str:
    """``sha256:<hex>`` of a file; a Hub cache blob is already named by its sha256."""
    real = Path(os.path.realpath(path))
    if real.parent.name == "blobs" and len(real.name) == 64:
        return "sha256:" + real.name
    digest = hashlib.sha256()
    with open(real, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()
