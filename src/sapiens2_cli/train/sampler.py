"""Deterministic, resumable, sharded sampling for iteration-based training.

Training draws form one global stream ``g = 0, 1, 2, ...``; draw ``g`` belongs to rank
``g mod world_size`` and picks ``permutation_p[g' mod N]`` where ``g' = g`` counted over all
ranks, ``p = g // N`` is the pass and ``permutation_p`` a fresh shuffle seeded by
``(seed, p)``. Each item is ``(index, g)``: the dataset seeds the sample's augmentation RNG from
``(seed, g)``, so resuming at a known number of consumed draws reproduces the exact samples.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

__all__ = ["InfiniteSampler"]


class InfiniteSampler(torch.utils.data.Sampler):
    """Endless ``(index, draw)`` pairs for one rank.

    Args:
        length: dataset length N (> 0).
        seed: run seed.
        rank, world_size: this process's shard.
        start: draws this rank has already consumed (resume); the first item yielded is this
            rank's draw number ``start``.
    """

    def __init__(
        self, length: int, *, seed: int, rank: int = 0, world_size: int = 1, start: int = 0
    ) -> None:
        if length <= 0:
            raise ValueError("cannot sample from an empty dataset")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, {world_size})")
        self.length, self.seed, self.rank, self.world_size, self.start = (
            length,
            seed,
            rank,
            world_size,
            start,
        )

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.length)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        n = self.start
        cached_pass, perm = -1, None
        while True:
            draw = n * self.world_size + self.rank
            epoch, offset = divmod(draw, self.length)
            if epoch != cached_pass:
                cached_pass, perm = epoch, self._permutation(epoch)
            yield int(perm[offset]), draw
            n += 1
