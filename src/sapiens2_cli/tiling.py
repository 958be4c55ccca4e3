"""Overlapping-tile inference at the model's native scale, for frames larger than its input.

A frame ``[C, H, W]`` is covered by tiles of the model's input size that overlap by at least
``overlap`` pixels; tiles are run in batches of ``batch`` (so memory is bounded by the tile
batch, not the frame) and blended into a full-resolution canvas with separable raised-cosine
weights that ramp only where a tile has a neighbour. Inside the overlap every output pixel is
a weighted mean of the tiles covering it, so a head that reproduces its input reproduces the
frame exactly, and there are no hard seams.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator

import torch


@dataclasses.dataclass(frozen=True)
class TileGrid:
    """Tile origins along each axis for a ``height x width`` frame and ``tile`` (h, w) tiles."""

    height: int
    width: int
    tile: tuple[int, int]
    ys: tuple[int, ...]
    xs: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.ys) * len(self.xs)

    def origins(self) -> Iterator[tuple[int, int]]:
        for y in self.ys:
            for x in self.xs:
                yield y, x


def _starts(length: int, tile: int, overlap: int) -> tuple[int, ...]:
    """Evenly spread tile starts covering ``[0, length)`` with at least ``overlap`` shared pixels."""
    if length <= tile:
        return (0,)
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap {overlap} must be in [0, {tile})")
    n = math.ceil((length - overlap) / (tile - overlap))
    return tuple(round(i * (length - tile) / (n - 1)) for i in range(n))


def tile_grid(height: int, width: int, tile: tuple[int, int], overlap: int) -> TileGrid:
    """The tiles covering a frame; a frame smaller than a tile in one axis gets one (padded) tile."""
    return TileGrid(
        height, width, tile, _starts(height, tile[0], overlap), _starts(width, tile[1], overlap)
    )


def _ramp(size: int, start: int, stop: int, lead: bool, trail: bool) -> torch.Tensor:
    """1-D weights over a tile: raised-cosine ramps over the parts shared with neighbours."""
    w = torch.ones(size, dtype=torch.float64)
    idx = torch.arange(size, dtype=torch.float64)
    if lead and start > 0:
        w = torch.minimum(w, 0.5 - 0.5 * torch.cos(math.pi * (idx + 0.5) / start))
    if trail and stop > 0:
        w = torch.minimum(w, 0.5 - 0.5 * torch.cos(math.pi * (size - idx - 0.5) / stop))
    return w.clamp_min(1e-3)


def _axis_weights(starts: tuple[int, ...], tile: int, length: int) -> list[torch.Tensor]:
    out = []
    for i, s in enumerate(starts):
        lead = tile - (s - starts[i - 1]) if i > 0 else 0  # pixels shared with the previous tile
        trail = tile - (starts[i + 1] - s) if i + 1 < len(starts) else 0
        out.append(_ramp(min(tile, length), lead, trail, i > 0, i + 1 < len(starts)))
    return out


def tiled_apply(
    fn: Callable[[torch.Tensor], torch.Tensor],
    frame: torch.Tensor,
    *,
    tile: tuple[int, int],
    overlap: int,
    batch: int = 4,
    pad_value: torch.Tensor | None = None,
    out_device: torch.device | str | None = None,
) -> torch.Tensor:
    """Run ``fn`` over overlapping tiles of ``frame`` and blend the results.

    Args:
        fn: ``[b, C, th, tw] -> [b, C_out, th, tw]`` (a dense head at the input resolution).
        frame: ``[C, H, W]`` model-ready (normalised) frame.
        tile: model input ``(th, tw)`` in pixels.
        overlap: minimum shared pixels between neighbouring tiles.
        batch: tiles per call of ``fn`` (bounds memory).
        pad_value: ``[C]`` value for pixels outside the frame when it is smaller than a tile
            (the normalised value of a black pixel, as the official padding gives).
        out_device: where the blended canvas lives (default: the frame's device).

    Returns:
        ``[C_out, H, W]`` float32 weighted mean of the tile outputs.
    """
    c, height, width = frame.shape
    th, tw = tile
    grid = tile_grid(height, width, tile, overlap)
    wy = _axis_weights(grid.ys, th, height)
    wx = _axis_weights(grid.xs, tw, width)
    out_device = torch.device(out_device) if out_device is not None else frame.device
    canvas: torch.Tensor | None = None
    weight = torch.zeros(height, width, dtype=torch.float32, device=out_device)
    origins = list(grid.origins())
    for first in range(0, len(origins), batch):
        chunk = origins[first : first + batch]
        tiles = frame.new_empty((len(chunk), c, th, tw))
        if pad_value is not None:
            tiles[:] = pad_value.to(tiles)[None, :, None, None]
        else:
            tiles.zero_()
        for i, (y, x) in enumerate(chunk):
            patch = frame[:, y : y + th, x : x + tw]
            tiles[i, :, : patch.shape[1], : patch.shape[2]] = patch
        outs = fn(tiles).float().to(out_device)  # [b, C_out, th, tw]
        if outs.shape[-2:] != (th, tw):
            raise ValueError(f"tiled head must keep the tile size {tile}, got {tuple(outs.shape[-2:])}")
        if canvas is None:
            canvas = torch.zeros(outs.shape[1], height, width, dtype=torch.float32, device=out_device)
        for i, (y, x) in enumerate(chunk):
            h, w = min(th, height - y), min(tw, width - x)
            wt = (wy[grid.ys.index(y)][:h, None] * wx[grid.xs.index(x)][None, :w]).float().to(out_device)
            canvas[:, y : y + h, x : x + w] += outs[i, :, :h, :w] * wt
            weight[y : y + h, x : x + w] += wt
    assert canvas is not None
    return canvas / weight
