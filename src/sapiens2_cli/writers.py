"""Output files: PNG / JPEG / EXR / NPY / JSON / safetensors, always written atomically.

Every file is written to a hidden sibling ``.<name>.part`` and renamed over the final name,
so a killed run never leaves a partial file under its real name. The temporary name is
deterministic: the run that later redoes the item overwrites and renames it, so nothing is
left behind either. (Two processes must therefore never own the same output file, which
sharding guarantees.)
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np

from sapiens2_cli.exr import write_exr

FileKind = Literal["png", "jpg", "exr", "npy", "json", "safetensors", "mp4", "jsonl"]
PART_SUFFIX = ".part"
JPEG_QUALITY = 95


@dataclasses.dataclass(frozen=True)
class FileData:
    """One output file's content.

    ``png`` / ``jpg``: uint8 ``[H, W]`` or ``[H, W, 3]`` **BGR** (OpenCV order);
    ``exr``: float32 ``[H, W, C]`` with ``channels`` names; ``npy``: any array;
    ``json``: a JSON-serialisable object; ``safetensors``: ``{"tensors": {name: array},
    "metadata": {str: str}}``. ``mp4`` and ``jsonl`` are video streams
    (:mod:`sapiens2_cli.streams`), fed one frame at a time with ``jpg`` / ``json`` content.
    """

    kind: FileKind
    data: Any
    channels: tuple[str, ...] = ()


def part_path(path: Path, *, unique: bool = False) -> Path:
    """The temporary name a file is written under before the rename.

    ``unique`` adds the process id, for files that several processes may write at once
    (the per-run files such as ``classes.json``, identical in every shard).
    """
    tag = f".{os.getpid()}" if unique else ""
    return path.with_name(f".{path.name}{tag}{PART_SUFFIX}")


def atomic_write(path: Path, write: Callable[[Path], None], *, unique_temp: bool = False) -> None:
    """Call ``write(tmp)`` then rename ``tmp`` to ``path``; ``tmp`` is removed on failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = part_path(path, unique=unique_temp)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_bytes(data: bytes) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return write


def encode_image(array: np.ndarray, ext: Literal[".png", ".jpg"]) -> bytes:
    """PNG or JPEG bytes of a uint8 ``[H, W]`` / ``[H, W, 3]`` BGR array."""
    if array.dtype != np.uint8:
        raise ValueError(f"{ext} images are written from uint8 arrays, got {array.dtype}")
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY] if ext == ".jpg" else []
    ok, buf = cv2.imencode(ext, np.ascontiguousarray(array), params)
    if not ok:
        raise ValueError(f"OpenCV could not encode a {array.shape} array as {ext}")
    return buf.tobytes()


def write_file(path: Path, content: FileData, *, unique_temp: bool = False) -> None:
    """Write ``content`` to ``path`` atomically in its format (see :func:`part_path` for ``unique_temp``)."""
    kind = content.kind
    if kind in ("png", "jpg"):
        atomic_write(path, _write_bytes(encode_image(content.data, f".{kind}")), unique_temp=unique_temp)
    elif kind == "json":
        text = json.dumps(content.data, indent=1, ensure_ascii=False, allow_nan=False) + "\n"
        atomic_write(path, _write_bytes(text.encode("utf-8")), unique_temp=unique_temp)
    elif kind == "npy":
        array = np.ascontiguousarray(content.data)

        def write_npy(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.save(f, array, allow_pickle=False)

        atomic_write(path, write_npy, unique_temp=unique_temp)
    elif kind == "exr":
        atomic_write(path, lambda tmp: write_exr(tmp, content.data, content.channels), unique_temp=unique_temp)
    elif kind == "safetensors":
        from safetensors.numpy import save_file

        tensors = {k: np.ascontiguousarray(v) for k, v in content.data["tensors"].items()}
        metadata = dict(content.data.get("metadata") or {})
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), unique_temp=unique_temp)
    else:
        raise ValueError(f"unknown output kind {kind!r}")


class WriterPool:
    """Writes files on background threads, with at most ``max_pending`` jobs queued or running.

    :meth:`submit` blocks while the pool is full, so slow storage throttles the producer
    instead of filling memory with finished predictions.
    """

    def __init__(self, workers: int, *, max_pending: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=max(workers, 1), thread_name_prefix="sapiens2-write")
        self._pending: collections.deque[Future] = collections.deque()
        self._max_pending = max(max_pending, 1)

    def submit(self, fn: Callable[..., Any], *args: Any) -> list[Future]:
        """Queue ``fn(*args)``; returns the futures that finished meanwhile (in submission order)."""
        done = []
        while len(self._pending) >= self._max_pending:
            oldest = self._pending.popleft()
            oldest.exception()  # wait; the caller reads the result
            done.append(oldest)
        done.extend(self.harvest())
        self._pending.append(self._pool.submit(fn, *args))
        return done

    def harvest(self) -> list[Future]:
        """Futures finished so far, without waiting."""
        done = [f for f in self._pending if f.done()]
        for f in done:
            self._pending.remove(f)
        return done

    def drain(self) -> list[Future]:
        """Wait for every queued job; returns their futures."""
        done = list(self._pending)
        self._pending.clear()
        for f in done:
            f.exception()
        return done

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
