"""Patch masks for masked image modelling: block-wise and random, mixed per sample.

A mask is drawn on the encoder's token grid ``h x w`` (``H/16 x W/16``, or ``H/64 x W/64`` for
the 4K backbone, whose masking comes after the windowed tokenizer). Every sample masks
exactly ``M = round(ratio * h * w)`` cells so that the kept indices of a batch stack into one
``[B, K]`` tensor (``K = h*w - M``). With probability ``block_prob`` a sample's mask is
block-wise (BEiT's sampler: rectangles of random area and aspect until ``M`` cells are
covered, topped up with random cells when the rectangles stop fitting), otherwise a uniform
random subset. All randomness comes from the ``torch.Generator`` passed in.
"""

from __future__ import annotations

import dataclasses
import math
import random

import torch

BLOCK_ATTEMPTS = 10  # rectangle draws per block before giving up (BEiT uses 10)


@dataclasses.dataclass(frozen=True)
class Masks:
    """Kept and masked cell indices, row-major over the grid, each row sorted ascending.

    ``keep`` ``[B, K]`` and ``masked`` ``[B, M]`` int64 partition ``range(h*w)`` per sample;
    ``mask`` ``[B, h*w]`` bool is True at masked cells.
    """

    keep: torch.Tensor
    masked: torch.Tensor
    mask: torch.Tensor


def num_masked(num_cells: int, ratio: float) -> int:
    """``round(ratio * num_cells)``, kept within ``[1, num_cells - 1]`` so both sides exist."""
    return min(max(round(ratio * num_cells), 1), num_cells - 1)


def random_mask(h: int, w: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``[h*w]`` bool with exactly ``count`` uniformly chosen True cells."""
    mask = torch.zeros(h * w, dtype=torch.bool)
    mask[torch.randperm(h * w, generator=generator)[:count]] = True
    return mask


def block_mask(
    h: int,
    w: int,
    count: int,
    generator: torch.Generator,
    *,
    min_block: int = 4,
    aspect: float = 0.3,
) -> torch.Tensor:
    """``[h*w]`` bool with exactly ``count`` True cells, laid out as rectangles.

    Each block draws a target area in ``[min_block, min(still needed, h*w/2)]`` (the half-grid
    cap is DINOv2's: one rectangle never swallows the whole mask) and a log-uniform aspect
    ratio in ``[aspect, 1/aspect]``; a rectangle is accepted when it adds at least one and at
    most the still-needed number of cells. When ``BLOCK_ATTEMPTS`` draws in a row fail, the
    remainder is filled with random unmasked cells so the count is exact.
    """
    rng = random.Random(int(torch.randint(2**62, (1,), generator=generator)))
    grid = [[False] * w for _ in range(h)]
    log_lo, log_hi = math.log(aspect), math.log(1.0 / aspect)
    done = 0
    while done < count:
        added = 0
        for _ in range(BLOCK_ATTEMPTS):
            need = count - done
            area = rng.uniform(min(min_block, need), max(min(need, h * w // 2), 1))
            ratio = math.exp(rng.uniform(log_lo, log_hi))
            bh = round(math.sqrt(area * ratio))
            bw = round(math.sqrt(area / ratio))
            if not (1 <= bh <= h and 1 <= bw <= w):
                continue
            top, left = rng.randint(0, h - bh), rng.randint(0, w - bw)
            new = sum(not grid[y][x] for y in range(top, top + bh) for x in range(left, left + bw))
            if 0 < new <= need:
                for y in range(top, top + bh):
                    for x in range(left, left + bw):
                        grid[y][x] = True
                added = new
                break
        if added == 0:
            break
        done += added
    mask = torch.tensor(grid, dtype=torch.bool).flatten()
    if done < count:  # top up: rectangles no longer fit the remaining holes
        free = (~mask).nonzero().flatten()
        pick = torch.randperm(free.numel(), generator=generator)[: count - done]
        mask[free[pick]] = True
    return mask


def sample_masks(
    batch: int,
    h: int,
    w: int,
    *,
    ratio: float = 0.75,
    block_prob: float = 0.4,
    generator: torch.Generator,
    min_block: int = 4,
    aspect: float = 0.3,
) -> Masks:
    """Masks for ``batch`` samples on an ``h x w`` grid, block-wise with prob ``block_prob``."""
    count = num_masked(h * w, ratio)
    rows = []
    for _ in range(batch):
        if float(torch.rand((), generator=generator)) < block_prob:
            rows.append(block_mask(h, w, count, generator, min_block=min_block, aspect=aspect))
        else:
            rows.append(random_mask(h, w, count, generator))
    mask = torch.stack(rows)  # [B, N]
    order = torch.argsort(mask.to(torch.int8), dim=1, stable=True)  # unmasked first, each sorted
    keep, masked = order[:, : h * w - count], order[:, h * w - count :]
    return Masks(keep=keep.contiguous(), masked=masked.contiguous(), mask=mask)
