"""OpenEXR read / write for float maps (normals, pointmaps, depth, albedo).

``write_exr(path, array, channel_names)`` stores an ``H x W x C`` float32 array as ``C``
float32 channels with ZIP compression; the write goes to a temporary file in the same folder
that is renamed over ``path`` only once it is complete, so a crash never leaves a truncated
file behind. EXR files store channels sorted by name, so the requested order is kept in a
header attribute (``sapiens2_channel_order``) and restored by ``read_exr``. Files written by
other programs come back in the conventional order when their channels form a known set
(``R, G, B[, A]``, ``X, Y, Z``), otherwise sorted by name; half and uint channels are converted
to float32.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ORDER_ATTRIBUTE = "sapiens2_channel_order"
_KNOWN_ORDERS = (("R", "G", "B", "A"), ("R", "G", "B"), ("X", "Y", "Z"), ("Y",), ("Z",))

__all__ = ["read_exr", "write_exr"]


def write_exr(path: str | Path, array: np.ndarray, channel_names: Sequence[str]) -> Path:
    """Write ``array`` (``[H, W, C]`` or ``[H, W]``, any float dtype) as float32 channels.

    Args:
        path: destination file; its folder must exist. Replaced atomically.
        array: pixel values, converted to float32; a 2-D array is one channel.
        channel_names: one distinct, non-empty name per channel, e.g. ``("X", "Y", "Z")``.

    Returns:
        ``path`` as a :class:`Path`.
    """
    import OpenEXR

    path = Path(path)
    data = np.asarray(array)
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim != 3 or data.shape[0] == 0 or data.shape[1] == 0:
        raise ValueError(f"{path}: write_exr needs an H x W x C array, got shape {array.shape}")
    names = [str(n) for n in channel_names]
    if len(names) != data.shape[2]:
        raise ValueError(
            f"{path}: {len(names)} channel names {names} for an array with {data.shape[2]} channels"
        )
    if len(set(names)) != len(names) or any(not n or "," in n for n in names):
        raise ValueError(
            f"{path}: channel names must be distinct, non-empty, without commas: {names}"
        )
    channels = {
        n: np.ascontiguousarray(data[:, :, i], dtype=np.float32) for i, n in enumerate(names)
    }
    header = {
        "compression": OpenEXR.ZIP_COMPRESSION,
        "type": OpenEXR.scanlineimage,
        ORDER_ATTRIBUTE: ",".join(names),
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.exr", dir=path.parent)
    os.close(fd)
    try:
        with OpenEXR.File(header, channels) as exr_file:
            exr_file.write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_exr(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """Read every channel of a scan-line or tiled single-part EXR file.

    Returns:
        ``(array, names)``: float32 ``[H, W, C]`` and the channel names in order (see module
        docstring for how the order is chosen).
    """
    import OpenEXR

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such EXR file")
    try:
        with OpenEXR.File(str(path), separate_channels=True) as exr_file:
            stored_order = exr_file.header().get(ORDER_ATTRIBUTE)  # the header empties on close
            channels = {name: np.array(ch.pixels) for name, ch in exr_file.channels().items()}
    except Exception as err:  # the binding raises plain exceptions for corrupt files
        raise ValueError(f"{path}: not a readable EXR file ({err})") from err
    if not channels:
        raise ValueError(f"{path}: EXR file has no channels")
    names = _channel_order(stored_order, list(channels))
    shapes = {channels[n].shape for n in names}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(
            f"{path}: EXR channels have unequal or sub-sampled shapes {sorted(shapes)}"
        )
    array = np.stack([channels[n].astype(np.float32) for n in names], axis=-1)
    return array, names


def _channel_order(stored: object, present: list[str]) -> list[str]:
    if isinstance(stored, bytes):
        stored = stored.decode()
    if isinstance(stored, str):
        order = stored.split(",")
        if sorted(order) == sorted(present):
            return order
    for known in _KNOWN_ORDERS:
        if sorted(known) == sorted(present):
            return list(known)
    return sorted(present)
