"""Resolve, read, convert and strictly load the person detector's weights.

A reference is one of:

* ``"default"`` / ``"rtmdet-m"``: ``rtmdet_m.pth`` of the Hub repo
  ``facebook/sapiens-pose-bbox-detector`` (through the Hugging Face cache);
* a Hub repo id ``"owner/name"`` or ``"owner/name@revision"`` holding ``rtmdet_m.pth``;
* a local mmdet checkpoint (``.pth``, legacy or zip format), read with
  ``torch.load(weights_only=True)`` (never unpickling arbitrary objects), taking its
  ``["state_dict"]`` (a bare state dict is accepted too);
* a local ``.safetensors`` file with the same 692 keys;
* a local folder holding ``rtmdet_m.pth`` (e.g. ``$SAPIENS_CHECKPOINT_ROOT/detector``).

The first load of a ``.pth`` writes a safetensors copy to
``$SAPIENS2_CACHE/detector/<sha256 prefix>.safetensors`` (default cache root
``$XDG_CACHE_HOME/sapiens2`` or ``~/.cache/sapiens2``); later loads of the same file read
that copy. Loading is strict: missing, unexpected or mis-shaped keys are an error that names
them and the file.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from sapiens2_cli.hub import hub_file
from sapiens2_cli.models.detector import Detector

DEFAULT_REPO = "facebook/sapiens-pose-bbox-detector"
DEFAULT_FILENAME = "rtmdet_m.pth"
ALIASES = ("default", "rtmdet-m")
FORMAT_TAG = "sapiens2-detector/rtmdet-m"

_HUB_REF = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
_SHOWN = 8  # key names listed in an error before "... and N more"


class DetectorWeightsError(RuntimeError):
    """A detector weights file is unreadable or is not an RTMDet-m person-detector checkpoint."""


def cache_dir() -> Path:
    """Folder for converted detector weights: ``$SAPIENS2_CACHE/detector`` or the XDG default."""
    root = os.environ.get("SAPIENS2_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = str(Path(xdg) / "sapiens2")
    return Path(root).expanduser() / "detector"


def resolve_detector_file(ref: str | os.PathLike[str]) -> Path:
    """Local path of the weights named by ``ref`` (see the module docstring)."""
    text = os.fspath(ref)
    if text in ALIASES:
        return hub_file(DEFAULT_REPO, DEFAULT_FILENAME)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if (path / DEFAULT_FILENAME).is_file():
            return path / DEFAULT_FILENAME
        raise DetectorWeightsError(
            f"{path} is a folder without {DEFAULT_FILENAME} (expected a .pth or .safetensors "
            "file, or a folder holding rtmdet_m.pth)"
        )
    if path.suffix in (".pth", ".pt", ".safetensors"):
        raise FileNotFoundError(f"detector weights file {path} does not exist")
    match = _HUB_REF.match(text)
    if match is None:
        raise DetectorWeightsError(
            f"cannot understand detector reference {text!r}: expected one of {ALIASES}, "
            "a Hub repo id 'owner/name[@revision]', or a .pth / .safetensors file"
        )
    return hub_file(match["repo"], DEFAULT_FILENAME, revision=match["revision"])


def load_detector(
    ref: str | os.PathLike[str] = "default", *, device: str | torch.device = "cpu"
) -> Detector:
    """Build the RTMDet-m person :class:`Detector`, load ``ref``'s weights strictly, eval mode.

    ``device``: where the model lives (``"cpu"``, ``"cuda"``, ``torch.device``); float32.
    Raises :class:`DetectorWeightsError` naming the file when it is unreadable or its keys or
    shapes do not match, and :class:`sapiens2_cli.hub.HubError` when a Hub file is not
    available.
    """
    path = resolve_detector_file(ref)
    with torch.device("meta"):
        model = Detector()  # no memory, no random init: every tensor comes from the file
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state_dict = read_detector_state_dict(path, expected)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.to(device).eval()


def read_detector_state_dict(
    path: Path, expected: Mapping[str, tuple[int, ...]]
) -> dict[str, torch.Tensor]:
    """Checked float32 tensors of a weights file; a ``.pth`` goes through the conversion cache.

    ``expected``: key -> shape of the model (see :func:`check_state_dict`).
    """
    if _is_safetensors(path):
        return check_state_dict(_read_safetensors(path)[0], expected, source=path)
    digest = _sha256(path)
    cached = cache_dir() / f"{digest[:16]}.safetensors"
    if cached.is_file():
        try:
            tensors, metadata = _read_safetensors(cached)
        except DetectorWeightsError as err:
            warnings.warn(f"ignoring unreadable cache file {cached} ({err})", stacklevel=3)
        else:
            if metadata.get("source_sha256") == digest:
                return check_state_dict(
                    tensors, expected, source=f"{cached} (converted from {path})"
                )
            warnings.warn(f"{cached} was not converted from {path}; converting again", stacklevel=3)
    state_dict = check_state_dict(_read_torch_checkpoint(path), expected, source=path)
    _write_cache(state_dict, cached, source=path, digest=digest)
    return state_dict


def check_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple[int, ...]],
    *,
    source: str | os.PathLike[str],
) -> dict[str, torch.Tensor]:
    """Validate names and shapes against ``expected`` and return float32 copies.

    A leading ``module.`` is stripped. Missing ``num_batches_tracked`` counters (unused at
    inference) are filled with 0; any other missing key, any unexpected key, any shape
    mismatch, and head convs that should be shared across levels but differ, raise
    :class:`DetectorWeightsError` naming the keys and ``source``.
    """
    tensors = {k.removeprefix("module."): v for k, v in state_dict.items()}
    bad_types = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
    if bad_types:
        raise DetectorWeightsError(f"{source}: entries are not tensors: {_names(bad_types)}")
    if not any(k in expected for k in tensors):
        raise DetectorWeightsError(
            f"{source} is not an RTMDet-m person-detector checkpoint: none of its "
            f"{len(tensors)} keys is a detector key (first: {_names(list(tensors))})"
        )
    for key in expected:
        if key.endswith("num_batches_tracked") and key not in tensors:
            tensors[key] = torch.zeros((), dtype=torch.long)
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    problems = []
    if missing:
        problems.append(f"missing keys {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_names(unexpected)}")
    shapes = [
        f"{k} {tuple(tensors[k].shape)} (expected {tuple(shape)})"
        for k, shape in expected.items()
        if k in tensors and tuple(tensors[k].shape) != tuple(shape)
    ]
    if shapes:
        problems.append(f"mis-shaped {_names(shapes)}")
    if problems:
        raise DetectorWeightsError(
            f"{source} does not match the RTMDet-m person detector: " + "; ".join(problems)
        )
    for group in _shared_conv_keys(expected):
        first = tensors[group[0]]
        differing = [k for k in group[1:] if not torch.equal(tensors[k], first)]
        if differing:
            raise DetectorWeightsError(
                f"{source}: {_names(differing)} should equal {group[0]} (one conv shared by "
                "the three head levels) but differ"
            )
    # Fresh copies: tensors read from a safetensors buffer can sit at addresses that are not
    # 64-byte aligned, which makes oneDNN pick kernels that round differently.
    return {
        k: v.to(torch.float32 if v.is_floating_point() else v.dtype, copy=True)
        for k, v in tensors.items()
    }


def _shared_conv_keys(expected: Mapping[str, object]) -> list[list[str]]:
    """Key groups of the head convs shared by the three levels (level 0 first)."""
    groups: dict[str, list[str]] = {}
    pattern = re.compile(r"^bbox_head\.(cls|reg)_convs\.\d+\.(\d+)\.conv\.weight$")
    for key in expected:
        match = pattern.match(key)
        if match:
            groups.setdefault(f"{match[1]}.{match[2]}", []).append(key)
    return list(groups.values())


def _names(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOWN])
    return shown + (f" ... and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")


def _is_safetensors(path: Path) -> bool:
    """Safetensors files start with an 8-byte little-endian header size, then ``{``."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 1


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and string metadata of a safetensors file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise DetectorWeightsError(f"{path} is not a readable safetensors file ({err})") from err
    return tensors, metadata


def _read_torch_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """``state_dict`` of an mmengine checkpoint (or a bare state dict), loaded weights-only."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if not (magic.startswith(b"\x80") or magic == b"PK\x03\x04"):
        raise DetectorWeightsError(
            f"{path} is neither a PyTorch checkpoint nor a safetensors file (starts with {magic!r})"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise DetectorWeightsError(
            f"{path} holds objects other than tensors and plain containers, which are not "
            "loaded for safety; the published detector checkpoint has none (a training "
            f"checkpoint must be published first). Details: {str(err).splitlines()[0]}"
        ) from err
    except (EOFError, RuntimeError, KeyError, ValueError, OSError) as err:
        raise DetectorWeightsError(
            f"{path} is not a readable PyTorch checkpoint (truncated or corrupted?): "
            f"{type(err).__name__}: {err}"
        ) from err
    if isinstance(checkpoint, Mapping) and "state_dict" in checkpoint:
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, Mapping):
        raise DetectorWeightsError(
            f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict with a 'state_dict'"
        )
    return dict(checkpoint)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _write_cache(
    state_dict: Mapping[str, torch.Tensor], target: Path, *, source: Path, digest: str
) -> None:
    """Write ``state_dict`` as safetensors atomically; a failure only costs speed (warning)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in state_dict.items():
        value = value.contiguous()
        pointer = value.untyped_storage().data_ptr()
        # safetensors refuses aliased tensors: the shared head convs get their own copy.
        tensors[key] = value.clone() if pointer in seen else value
        seen.add(pointer)
    metadata = {"format": FORMAT_TAG, "source_sha256": digest, "source_name": source.name}
    tmp_name = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".safetensors")
        os.close(fd)
        save_file(tensors, tmp_name, metadata=metadata)
        os.replace(tmp_name, target)
    except OSError as err:
        warnings.warn(
            f"could not cache converted detector weights at {target}: {err}", stacklevel=4
        )
        if tmp_name is not None and os.path.exists(tmp_name):
            os.unlink(tmp_name)
