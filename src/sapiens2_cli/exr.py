"""OpenEXR files with named channels (single part, scanline, uncompressed by default).

Model outputs are float32 with noisy low mantissa bits: ZIP saves about 5% of the size of a
normal map for five times the write time, so files are written uncompressed unless asked.

EXR stores channels sorted by name, so the order given to :func:`write_exr` is kept in a
``channelOrder`` header attribute and restored by :func:`read_exr`. Files without it come back
in a conventional order: R, G, B, A; then X, Y, Z; then the remaining names sorted.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ORDER_ATTRIBUTE = "channelOrder"
_CONVENTIONAL = ("R", "G", "B", "A", "X", "Y", "Z")


def write_exr(
    path: str | os.PathLike, array: np.ndarray, channel_names: Sequence[str], *, compression: str = "none"
) -> Path:
    """Write ``array`` ``[H, W, C]`` or ``[H, W]`` (float32, or float16 for half channels) as channels
    ``channel_names``, atomically (a temporary file in the same folder, then a rename).

    ``compression``: ``"none"``, ``"zip"``, ``"zips"``, ``"piz"`` or ``"rle"`` (all lossless).
    """
    import OpenEXR

    codecs = {
        "none": OpenEXR.NO_COMPRESSION, "zip": OpenEXR.ZIP_COMPRESSION, "zips": OpenEXR.ZIPS_COMPRESSION,
        "piz": OpenEXR.PIZ_COMPRESSION, "rle": OpenEXR.RLE_COMPRESSION,
    }  # fmt: skip
    if compression not in codecs:
        raise ValueError(f"unknown EXR compression {compression!r}; choose from {', '.join(codecs)}")
    path = Path(path)
    names = list(channel_names)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise ValueError(f"{path}: EXR data must be H x W or H x W x C, got shape {array.shape}")
    if array.shape[2] != len(names):
        raise ValueError(f"{path}: {len(names)} channel names {names} for an array with {array.shape[2]} channels")
    if len(set(names)) != len(names) or any("," in n for n in names):
        raise ValueError(f"{path}: channel names must be distinct and free of commas: {names}")
    if array.dtype not in (np.float32, np.float16):
        raise ValueError(f"{path}: EXR channels must be float32 or float16, got {array.dtype}")
    channels = {name: np.ascontiguousarray(array[..., i]) for i, name in enumerate(names)}
    header = {
        "compression": codecs[compression],
        "type": OpenEXR.scanlineimage,
        ORDER_ATTRIBUTE: ",".join(names),
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        OpenEXR.File(header, channels).write(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_exr(path: str | os.PathLike) -> tuple[np.ndarray, list[str]]:
    """Read a single-part EXR as ``([H, W, C] array, channel names)`` in the written order."""
    import OpenEXR

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such EXR file")
    try:
        f = OpenEXR.File(os.fspath(path), separate_channels=True)
    except RuntimeError as err:
        raise ValueError(f"{path}: not a readable EXR file ({err})") from err
    channels = {name: ch.pixels for name, ch in f.channels().items()}
    stored = f.header().get(ORDER_ATTRIBUTE)
    if isinstance(stored, str) and sorted(stored.split(",")) == sorted(channels):
        names = stored.split(",")
    else:
        names = [n for n in _CONVENTIONAL if n in channels]
        names += sorted(n for n in channels if n not in _CONVENTIONAL)
    return np.stack([channels[n] for n in names], axis=-1).astype(np.float32, copy=False), names
