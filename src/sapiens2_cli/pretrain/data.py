"""A streamed, sharded, exactly resumable image dataset for pretraining.

Sharding: units (image files, or tar shards) are numbered in walk order (``sources.walk``);
consumer ``c`` of ``C = world_size * num_workers`` (``c = rank * num_workers + worker``) takes
the units whose ordinal is ``c mod C``. Every consumer walks the same names (cheap: no
decoding, no global list held) and decodes only its own, so the shards are disjoint and
together complete, and balanced to one unit. Use many more tar shards than consumers.

Order: each consumer reads its stream in windows of ``shuffle_window`` items and serves each
window in a permutation seeded by ``(seed, epoch, consumer, window)`` -- a local shuffle,
adequate when shards were written in random order (the WebDataset convention). The stream
is infinite: at its end the epoch increments and the walk restarts (new permutations).

Position: ``(epoch, window, start, offset)`` where ``start`` is the stream cursor of the
window's first item (unit path, ordinal, samples of that unit already consumed) and
``offset`` the items of the permuted window already consumed. Resuming re-reads that one
window from ``start`` and skips ``offset`` items, so the next sample is exactly the one an
uninterrupted run would have served. Augmentation randomness is seeded by
``(seed, epoch, sample key)``, so a resumed sample is also augmented identically.

Corrupt images (undecodable bytes, unreadable files) and unreadable tar shards are skipped,
logged, and counted in the position (``corrupt``, ``bad_shards``).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from sapiens2_cli.pretrain.sources import (
    IMAGE_SUFFIXES,
    TAR_SUFFIXES,
    ShardError,
    SourceKind,
    detect_kind,
    stable_hash,
    tar_samples,
    walk,
)

log = logging.getLogger(__name__)
DONE = -1  # Cursor.member: the whole unit has been consumed
Transform = Callable[[np.ndarray, np.random.Generator], dict[str, torch.Tensor]]


@dataclasses.dataclass(frozen=True)
class Cursor:
    """A point in a consumer's stream: unit ``unit`` (number ``ordinal``), ``member`` samples in."""

    unit: tuple[str, ...] = ()
    ordinal: int = 0
    member: int = 0


@dataclasses.dataclass(frozen=True)
class Position:
    """Everything a consumer needs to serve exactly its next sample (see module docstring)."""

    epoch: int = 0
    window: int = 0
    start: Cursor = Cursor()
    offset: int = 0
    served: int = 0  # samples served, all epochs
    corrupt: int = 0  # images skipped because they could not be read or decoded
    bad_shards: int = 0  # tar shards abandoned because they could not be read

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["start"]["unit"] = "/".join(self.start.unit)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Position:
        start = dict(d["start"])
        start["unit"] = tuple(start["unit"].split("/")) if start["unit"] else ()
        return cls(**{**d, "start": Cursor(**start)})


@dataclasses.dataclass(frozen=True)
class _Item:
    key: str  # unique sample name: relative path, or shard path + "/" + member key
    at: Cursor  # where the item is
    after: Cursor  # where the stream continues after it
    data: bytes | None = None  # tar samples carry their bytes; folder items are read lazily
    error: str = ""  # a shard that failed mid-read


class PretrainStream(IterableDataset):
    """Images under ``root`` (a folder tree, or a tree of WebDataset ``.tar`` shards).

    Yields ``transform(image_bgr_uint8, rng)`` plus ``key`` and ``position``
    (``(consumer, Position.to_dict())`` after this sample). In the main process, pass every
    batch the loop consumes to ``note(batch)``; ``state_dict()`` then resumes a new iterator
    (same world size, worker count and window) at exactly the next sample.
    """

    def __init__(
        self,
        root: str | Path,
        transform: Transform,
        *,
        seed: int = 0,
        shuffle_window: int = 1024,
        num_workers: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        kind: SourceKind | None = None,
    ) -> None:
        super().__init__()
        self.root = Path(root)
        self.kind: SourceKind = kind or detect_kind(self.root)
        self.transform = transform
        self.seed = seed
        self.shuffle_window = shuffle_window
        self.workers = max(1, num_workers)
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        self.world_size = world_size if world_size is not None else (dist.get_world_size() if distributed else 1)
        self._positions: dict[int, dict[str, Any]] = {}
        self._worker_offset = 0
        self._batches = 0

    @property
    def num_consumers(self) -> int:
        return self.world_size * self.workers

    # ------------------------------------------------------------------ position bookkeeping

    def note(self, batch: dict[str, Any]) -> None:
        """Record that ``batch`` (from ``collate``) was consumed."""
        consumer, position = batch["position"]
        self._positions[consumer] = position
        self._batches += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "world_size": self.world_size,
            "num_workers": self.workers,
            "shuffle_window": self.shuffle_window,
            "seed": self.seed,
            "worker_offset": (self._worker_offset + self._batches) % self.workers,
            "positions": {str(c): p for c, p in self._positions.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("kind", "world_size", "num_workers", "shuffle_window", "seed"):
            mine = self.workers if key == "num_workers" else getattr(self, key)
            if state[key] != mine:
                raise ValueError(
                    f"{self.root}: cannot resume the data stream: {key} was {state[key]!r}, now {mine!r}"
                )
        self._positions = {int(c): p for c, p in state["positions"].items()}
        self._worker_offset = state["worker_offset"]
        self._batches = 0

    def counts(self) -> dict[str, int]:
        """Samples served, corrupt images and bad shards over this rank's noted consumers."""
        pos = [Position.from_dict(p) for p in self._positions.values()]
        return {k: sum(getattr(p, k) for p in pos) for k in ("served", "corrupt", "bad_shards")}

    # ------------------------------------------------------------------ streaming

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        if workers != self.workers:
            raise ValueError(
                f"{self.root}: the stream was built for {self.workers} loader workers but runs in {workers}"
            )
        logical = (worker + self._worker_offset + self._batches) % workers
        consumer = self.rank * workers + logical
        saved = self._positions.get(consumer)
        yield from self._serve(consumer, Position.from_dict(saved) if saved else Position())

    def _serve(self, consumer: int, pos: Position) -> Iterator[dict[str, Any]]:
        from_start = pos.start == Cursor() and pos.offset == 0
        while True:  # epochs
            items = self._items(consumer, pos.start)
            served_before = pos.served
            while window := list(itertools.islice(items, self.shuffle_window)):
                order = np.random.default_rng(
                    stable_hash(self.seed, "window", pos.epoch, consumer, pos.window)
                ).permutation(len(window))
                for p in range(pos.offset, len(window)):
                    item = window[order[p]]
                    sample = self._load(item, pos.epoch)
                    if p + 1 < len(window):
                        pos = dataclasses.replace(pos, offset=p + 1)
                    else:  # the next window starts right after this one's last item
                        pos = dataclasses.replace(pos, window=pos.window + 1, start=window[-1].after, offset=0)
                    if item.error:
                        pos = dataclasses.replace(pos, bad_shards=pos.bad_shards + 1)
                    elif sample is None:
                        pos = dataclasses.replace(pos, corrupt=pos.corrupt + 1)
                    else:
                        pos = dataclasses.replace(pos, served=pos.served + 1)
                        yield {**sample, "key": item.key, "position": (consumer, pos.to_dict())}
            if from_start and pos.served == served_before:
                raise RuntimeError(
                    f"{self.root}: data consumer {consumer} of {self.num_consumers} found no readable "
                    f"image in a full pass (too few {'shards' if self.kind == 'tar' else 'images'} "
                    "for the number of ranks x workers, or all corrupt)"
                )
            pos = Position(
                epoch=pos.epoch + 1, served=pos.served, corrupt=pos.corrupt, bad_shards=pos.bad_shards
            )
            from_start = True

    def _items(self, consumer: int, start: Cursor) -> Iterator[_Item]:
        """This consumer's items from ``start`` to the end of the walk."""
        suffixes = TAR_SUFFIXES if self.kind == "tar" else IMAGE_SUFFIXES
        units = walk(self.root, suffixes, start=start.unit)
        for ordinal, unit in enumerate(units, start=start.ordinal):
            if ordinal % self.num_consumers != consumer:
                continue
            skip = start.member if unit == start.unit else 0
            if skip == DONE:
                continue
            name = "/".join(unit)
            done = Cursor(unit, ordinal, DONE)
            if self.kind == "folder":
                yield _Item(name, Cursor(unit, ordinal, 0), done)
                continue
            member = skip
            try:
                for key, data in tar_samples(self.root.joinpath(*unit), skip=skip):
                    yield _Item(f"{name}/{key}", Cursor(unit, ordinal, member), Cursor(unit, ordinal, member + 1), data)
                    member += 1
            except ShardError as err:
                yield _Item(name, Cursor(unit, ordinal, member), done, error=str(err))

    def _load(self, item: _Item, epoch: int) -> dict[str, torch.Tensor] | None:
        """Decode and transform one item; None (logged) when it cannot be read."""
        if item.error:
            log.warning("skipping the rest of a shard: %s", item.error)
            return None
        data = item.data
        if data is None:
            path = self.root / item.key
            try:
                data = path.read_bytes()
            except OSError as err:
                log.warning("%s: unreadable image (%s), skipped", path, err)
                return None
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
        if image is None or image.size == 0:
            log.warning("%s/%s: not a decodable image, skipped", self.root, item.key)
            return None
        rng = np.random.default_rng(stable_hash(self.seed, "sample", epoch, item.key))
        return self.transform(image, rng)


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the tensors of one consumer's samples; keep their keys and the last position."""
    consumers = {s["position"][0] for s in samples}
    if len(consumers) != 1:
        raise RuntimeError(f"a batch mixes data consumers {sorted(consumers)}")
    out: dict[str, Any] = {
        k: torch.stack([s[k] for s in samples]) for k, v in samples[0].items() if isinstance(v, torch.Tensor)
    }
    out["keys"] = [s["key"] for s in samples]
    out["position"] = samples[-1]["position"]
    return out


def make_loader(stream: PretrainStream, batch_size: int) -> DataLoader:
    """A DataLoader over ``stream`` with its worker count; batches come from one consumer each."""
    return DataLoader(
        stream,
        batch_size=batch_size,
        num_workers=stream.workers if stream.workers > 1 else 0,
        collate_fn=collate,
        persistent_workers=False,
    )
