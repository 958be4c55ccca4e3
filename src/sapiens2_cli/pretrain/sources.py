"""Where pretraining samples come from: a lazy, deterministic walk over folders and tar shards.

Order without a global listing: the tree is walked depth-first with ``os.scandir``, entries
of each directory sorted by name (so every rank and worker, on any machine, sees the same
sequence; memory is bounded by the largest single directory, not the dataset). A position in
that sequence is a relative path; ``walk(start=...)`` resumes at it by pruning every
directory that sorts before it, so seeking costs one listing per directory level.

Units: an image file (folder datasets) or a ``.tar`` shard in WebDataset layout (members
``<key>.<ext>``; the key is the member path up to the first dot of its base name; the first
image member of each key is the sample, other members such as ``.json`` or ``.cls`` are
ignored). Tars (uncompressed) are read with ``tarfile`` in streaming mode (``r|``), never seeked.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
TAR_SUFFIXES = (".tar",)
SourceKind = Literal["folder", "tar"]


class ShardError(RuntimeError):
    """A tar shard cannot be read; the message names the file and the reason."""


def walk(
    root: Path, suffixes: tuple[str, ...], *, start: tuple[str, ...] = ()
) -> Iterator[tuple[str, ...]]:
    """Relative paths (as component tuples) of files ending in ``suffixes``, in walk order.

    Walk order = depth-first, each directory's entries sorted by name, i.e. lexicographic
    order of the component tuples. With ``start``, only paths ``>= start`` are produced.
    Hidden entries (leading dot) are skipped. Symlinked directories are not followed.
    """
    yield from _walk(Path(root), (), suffixes, start)


def _walk(
    folder: Path, prefix: tuple[str, ...], suffixes: tuple[str, ...], start: tuple[str, ...]
) -> Iterator[tuple[str, ...]]:
    with os.scandir(folder) as it:
        entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    for entry in entries:
        rest: tuple[str, ...] = ()
        if start:
            if entry.name < start[0]:
                continue
            if entry.name == start[0]:
                rest = start[1:]
            else:  # entries are sorted: everything from here on is past the start
                start = ()
        if entry.is_dir(follow_symlinks=False):
            yield from _walk(Path(entry.path), prefix + (entry.name,), suffixes, rest)
        elif entry.name.lower().endswith(suffixes) and not rest:
            yield prefix + (entry.name,)


def detect_kind(root: Path) -> SourceKind:
    """``tar`` when the first file the walk meets is a ``.tar`` shard, ``folder`` for an image."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such data directory")
    for rel in walk(root, IMAGE_SUFFIXES + TAR_SUFFIXES):
        return "tar" if rel[-1].lower().endswith(TAR_SUFFIXES) else "folder"
    raise FileNotFoundError(f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)}) or .tar shards found")


def tar_samples(path: Path, *, skip: int = 0) -> Iterator[tuple[str, bytes | None]]:
    """``(key, encoded image bytes)`` for each sample of a WebDataset tar, in member order.

    The first ``skip`` samples are read past without returning their bytes. Raises
    ``ShardError`` when the archive is unreadable or truncated (``tarfile`` in streaming mode
    reads a header cut short as the end of the archive, so the bytes left over after the last
    member are checked too: a complete tar ends on a 512-byte block boundary).
    """
    index = 0
    last_key = None
    try:
        size = os.path.getsize(path)
        with tarfile.open(path, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, _, base = member.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if not dot or "." + ext.lower().rsplit(".", 1)[-1] not in IMAGE_SUFFIXES:
                    continue
                key = f"{folder}/{stem}" if folder else stem
                if key == last_key:  # a second image of the same sample
                    continue
                last_key = key
                if index >= skip:
                    f = tar.extractfile(member)
                    yield key, f.read() if f is not None else None
                index += 1
            if tar.offset > size or (size - tar.offset) % tarfile.BLOCKSIZE:
                raise tarfile.ReadError(f"truncated: {size} bytes, last header at {tar.offset}")
    except (tarfile.TarError, OSError, EOFError) as err:
        raise ShardError(f"{path}: unreadable tar shard ({err})") from err


def stable_hash(*parts: object) -> int:
    """A 63-bit integer from ``parts``, identical on every machine and Python process."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
