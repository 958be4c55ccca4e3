"""Mask sampling: exact counts, sorted partitions, block structure, mixing, determinism."""

from __future__ import annotations

import pytest
import torch
from pretrain_synthetic import single_thread  # noqa: F401 - autouse fixture

from sapiens2_cli.models.arch import ARCHS
from sapiens2_cli.pretrain.masking import (
    block_mask,
    num_masked,
    random_mask,
    sample_masks,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(("h", "w"), [(64, 48), (8, 8), (4, 4)])
def test_counts_partition_and_sorting(h, w):
    masks = sample_masks(6, h, w, ratio=0.75, block_prob=0.5, generator=_gen(0))
    n = h * w
    m = num_masked(n, 0.75)
    assert m == round(0.75 * n)
    assert masks.keep.shape == (6, n - m) and masks.masked.shape == (6, m)
    for keep, masked, mask in zip(masks.keep, masks.masked, masks.mask):
        assert torch.equal(keep, keep.sort().values) and torch.equal(masked, masked.sort().values)
        assert torch.equal(torch.cat([keep, masked]).sort().values, torch.arange(n))
        assert mask.sum() == m and mask[masked].all() and not mask[keep].any()


def test_full_size_grid_masks_2304_of_3072():
    assert num_masked(64 * 48, 0.75) == 2304
    # the 4K backbone masks its post-tokenizer grid: 4096x3072 px / 64 px cells = 64x48 as well
    arch = ARCHS["1b-4k"]
    assert (4096 // arch.stride, 3072 // arch.stride) == (64, 48)


def _neighbour_fraction(mask: torch.Tensor, h: int, w: int) -> float:
    """Fraction of masked cells whose right or lower neighbour is also masked."""
    grid = mask.view(h, w)
    right = grid[:, :-1] & grid[:, 1:]
    down = grid[:-1] & grid[1:]
    return float((right.sum() + down.sum()) / (2 * grid.sum()))


def test_block_masks_are_blocky_and_exact():
    h, w, count = 32, 24, num_masked(32 * 24, 0.75)
    block, rand = [], []
    for seed in range(5):
        bm = block_mask(h, w, count, _gen(seed))
        rm = random_mask(h, w, count, _gen(seed))
        assert bm.sum() == count and rm.sum() == count
        block.append(_neighbour_fraction(bm, h, w))
        rand.append(_neighbour_fraction(rm, h, w))
    # random masking at 75 % gives ~0.73 masked neighbours; rectangles give clearly more
    assert min(block) > max(rand) + 0.05, (block, rand)


def test_block_probability_is_per_sample():
    masks = sample_masks(400, 6, 6, ratio=0.75, block_prob=0.4, generator=_gen(1))
    blocky = [_neighbour_fraction(m, 6, 6) for m in masks.mask]
    all_block = sample_masks(50, 6, 6, ratio=0.75, block_prob=1.0, generator=_gen(2)).mask
    all_rand = sample_masks(50, 6, 6, ratio=0.75, block_prob=0.0, generator=_gen(3)).mask
    mean_block = sum(_neighbour_fraction(m, 6, 6) for m in all_block) / 50
    mean_rand = sum(_neighbour_fraction(m, 6, 6) for m in all_rand) / 50
    # the mixture's mean sits at 40 % of the way from random to block-wise
    frac = (sum(blocky) / len(blocky) - mean_rand) / (mean_block - mean_rand)
    assert 0.25 < frac < 0.55, frac


def test_deterministic_under_the_generator():
    a = sample_masks(8, 16, 12, generator=_gen(7))
    b = sample_masks(8, 16, 12, generator=_gen(7))
    c = sample_masks(8, 16, 12, generator=_gen(8))
    assert torch.equal(a.mask, b.mask) and torch.equal(a.keep, b.keep)
    assert not torch.equal(a.mask, c.mask)


def test_ratio_extremes_keep_both_sides():
    masks = sample_masks(2, 2, 2, ratio=0.99, generator=_gen(0))
    assert masks.keep.shape == (2, 1) and masks.masked.shape == (2, 3)
