"""Tiled inference: coverage, exact reconstruction through an identity head, smooth blending."""

from __future__ import annotations

import pytest
import torch

from sapiens2_cli.tiling import tile_grid, tiled_apply


@pytest.mark.parametrize("size", [(300, 200), (64, 48), (1000, 333), (40, 500)])
def test_grid_covers_frame_with_overlap(size):
    h, w = size
    grid = tile_grid(h, w, (64, 48), 16)
    covered = torch.zeros(h, w, dtype=torch.int32)
    for y, x in grid.origins():
        covered[y : y + 64, x : x + 48] += 1
    assert covered.min() >= 1
    for starts, tile, length in ((grid.ys, 64, h), (grid.xs, 48, w)):
        assert starts[0] == 0 and (starts[-1] + tile >= length)
        assert all(b - a <= tile - 16 for a, b in zip(starts, starts[1:]))


@pytest.mark.parametrize("size", [(300, 200), (64, 48), (130, 40)])
def test_identity_head_reconstructs_the_frame(size):
    gen = torch.Generator().manual_seed(0)
    frame = torch.randn(3, *size, generator=gen)
    calls = []

    def identity(x):
        calls.append(x.shape[0])
        return x * 1.0

    out = tiled_apply(identity, frame, tile=(64, 48), overlap=16, batch=3, pad_value=torch.zeros(3))
    torch.testing.assert_close(out, frame, atol=2e-6, rtol=0)
    assert max(calls) <= 3


def test_blend_has_no_seam_for_a_tile_dependent_head():
    # A head whose output depends on where the tile sits (a per-tile offset) must be blended
    # smoothly: the largest step between neighbouring pixels stays far below the offsets.
    frame = torch.zeros(1, 256, 192)
    offsets = iter(torch.arange(100, dtype=torch.float32))

    def biased(x):
        return torch.stack([x[i] + next(offsets) for i in range(x.shape[0])])

    out = tiled_apply(biased, frame, tile=(64, 48), overlap=32, batch=2)[0]
    steps = max(out.diff(dim=0).abs().max().item(), out.diff(dim=1).abs().max().item())
    spread = out.max().item() - out.min().item()
    assert spread > 5
    assert steps < spread / 8
