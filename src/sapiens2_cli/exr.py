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

import numpy as np

ORDER_ATTRIBUTE = "channelOrder"
_CONVENTIONAL = ("R", "G", "B", "A", "X", "Y", "Z")


def write_exr(
    path: str | os.PathLike, array: np.ndarray, channel_names: Sequence[str], *, compression: str = "none"
) -> None:
    """Write ``array`` ``[H, W, C]`` (float32, or float16 for half channels) as channels ``channel_names``.

    ``compression``: ``"none"``, ``"zip"``, ``"zips"``, ``"piz"`` or ``"rle"`` (all lossless).
    """
    import OpenEXR

    codecs = {
        "none": OpenEXR.NO_COMPRESSION, "zip": OpenEXR.ZIP_COMPRESSION, "zips": OpenEXR.ZIPS_COMPRESSION,
        "piz": OpenEXR.PIZ_COMPRESSION, "rle": OpenEXR.RLE_COMPRESSION,
    }  # fmt: skip
    if compression not in codecs:
        raise ValueError(f"unknown EXR compression {compression!r}; choose from {', '.join(codecs)}")

    if array.ndim != 3 or array.shape[2] != len(channel_names):
        raise ValueError(f"array of shape {array.shape} does not match channels {list(channel_names)}")
    if array.dtype not in (np.float32, np.float16):
        raise ValueError(f"EXR channels must be float32 or float16, got {array.dtype}")
    if len(set(channel_names)) != len(channel_names) or any("," in n for n in channel_names):
        raise ValueError(f"channel names must be unique and free of commas: {list(channel_names)}")
    channels = {name: np.ascontiguousarray(array[..., i]) for i, name in enumerate(channel_names)}
    header = {
        "compression": codecs[compression],
        "type": OpenEXR.scanlineimage,
        ORDER_ATTRIBUTE: ",".join(channel_names),
    }
    OpenEXR.File(header, channels).write(os.fspath(path))


def read_exr(path: str | os.PathLike) -> tuple[np.ndarray, list[str]]:
    """Read a single-part EXR as ``([H, W, C] array, channel names)`` in the written order."""
    import OpenEXR

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
    return np.stack([channels[n] for n in names], axis=-1), names
