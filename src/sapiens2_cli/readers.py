"""Image decoding and prefetching.

Images are decoded exactly as the official demo reads them (``cv2.imread`` with default flags),
but from bytes (``cv2.imdecode``) so that any path, unicode included, works:

* the result is 8-bit, 3-channel **BGR**; EXIF orientation is applied;
* grey images are replicated to three channels; an alpha channel is dropped (not composited);
* 16-bit images are reduced to 8 bits by OpenCV's own rule, which depends on the format:
  PNG keeps the high byte (``v // 256``), TIFF rounds ``v / 257``. This is what the official
  pipeline sees, so it is kept.

Bad inputs raise :class:`ReadError` whose message is the reason alone (the caller names the
file): empty, truncated, corrupt, not an image, or smaller than :data:`MIN_SIDE` pixels.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import cv2
import numpy as np

MIN_SIDE = 16  # pixels; smaller images are refused (one patch of the backbone)

_END = object()
T = TypeVar("T")
R = TypeVar("R")

_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


class ReadError(Exception):
    """An input that cannot be used; the message is the reason, without the file name."""


def image_format(data: bytes) -> str | None:
    """``"JPEG"``, ``"PNG"``, ``"WEBP"``, ``"BMP"``, ``"TIFF"`` from the file signature, else None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for magic, name in _SIGNATURES:
        if data.startswith(magic):
            return name
    return None


def _truncation(data: bytes, fmt: str) -> str | None:
    """Why ``data`` is visibly cut short, checked before decoding (some decoders accept it)."""
    if fmt == "JPEG":
        # Entropy-coded data cannot hold an unescaped FFD9, so the last scan must be followed by EOI.
        last_scan = data.rfind(b"\xff\xda")
        if last_scan < 0 or data.find(b"\xff\xd9", last_scan) < 0:
            return "truncated JPEG (no end-of-image marker after the last scan)"
    if fmt == "PNG" and data.rfind(b"IEND") < 0:
        return "truncated PNG (no IEND chunk)"
    return None


def decode_image(data: bytes) -> np.ndarray:
    """Decode an encoded image to ``[H, W, 3]`` uint8 BGR (see the module notes)."""
    if not data:
        raise ReadError("empty file (0 bytes)")
    fmt = image_format(data)
    if fmt is None:
        raise ReadError("not an image (unrecognised file signature; expected JPEG, PNG, WebP, BMP or TIFF)")
    cut = _truncation(data, fmt)
    if cut:
        raise ReadError(cut)
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as err:
        raise ReadError(f"corrupt {fmt} data ({str(err).strip().splitlines()[-1]})") from err
    if image is None:
        raise ReadError(f"corrupt or truncated {fmt} data (the decoder refused it)")
    h, w = image.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise ReadError(f"image too small ({w}x{h} pixels; at least {MIN_SIDE} on each side)")
    return image


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read and decode one image file to ``[H, W, 3]`` uint8 BGR; :class:`ReadError` if unusable."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except IsADirectoryError as err:
        raise ReadError("is a directory, not an image file") from err
    except FileNotFoundError as err:
        raise ReadError("no such file") from err
    except PermissionError as err:
        raise ReadError("permission denied") from err
    except OSError as err:
        raise ReadError(f"cannot read ({err.strerror or err})") from err
    return decode_image(data)


def prefetch(
    items: Iterable[T], fn: Callable[[T], R], *, workers: int, depth: int
) -> Iterator[tuple[T, R]]:
    """``(item, fn(item))`` in input order, computed ahead by ``workers`` threads.

    At most ``depth`` results are pending or waiting at any time, which bounds memory.
    OpenCV decoding and resizing release the GIL, so threads overlap them with the model.
    ``workers=0`` runs ``fn`` inline. Exceptions raised by ``fn`` propagate to the caller.
    """
    if workers <= 0:
        for item in items:
            yield item, fn(item)
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sapiens2-read")
    window: collections.deque[tuple[T, Future[R]]] = collections.deque()
    source = iter(items)
    try:
        for item in source:
            window.append((item, pool.submit(fn, item)))
            if len(window) >= max(depth, 1):
                break
        while window:
            item, future = window.popleft()
            nxt = next(source, _END)
            if nxt is not _END:
                window.append((nxt, pool.submit(fn, nxt)))
            yield item, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
