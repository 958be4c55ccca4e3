"""Overlapping-tile inference at the model's native scale, for frames larger than its input.

A frame ``[C, H, W]`` is covered by tiles of the model's input size that overlap by at least
``overlap`` pixels; tiles are blended into the full-resolution frame with separable
raised-cosine weights that ramp only where a tile has a neighbour. Inside the overlap every
output pixel is a weighted mean of the tiles covering it, so a head that reproduces its input
reproduces the frame exactly, and there are no hard seams.

Memory is bounded by the tiles, not by the frame: :class:`TileBlender` cuts the frame into
*cells* (rectangles covered by a fixed set of tiles). A cell covered by one tile is final as
soon as that tile arrives; a cell shared by several tiles is accumulated (weighted sum and
weight sum, float32) until its last tile arrives, then finalised and freed. With tiles in
raster order the pending cells are at most one strip of overlap across the frame plus one
overlap column, never a canvas of the frame's size in the model's output channels.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterator

import torch


@dataclasses.dataclass(frozen=True)
class TileGrid:
    """Tile origins along each axis for a ``height x width`` frame and ``tile`` (h, w) tiles.

    Tile ``index`` is row-major: ``index = row * len(xs) + column``.
    """

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


@dataclasses.dataclass(frozen=True)
class _Axis:
    """One axis of a grid cut into segments, each covered by a fixed run of tiles."""

    starts: tuple[int, ...]
    segments: tuple[tuple[int, int], ...]  # [a, b) in frame pixels
    cover: tuple[tuple[int, ...], ...]  # tiles covering each segment
    weights: list[torch.Tensor]  # per tile, float64 over its valid extent

    @classmethod
    def of(cls, starts: tuple[int, ...], tile: int, length: int) -> _Axis:
        ends = [min(s + tile, length) for s in starts]
        cuts = sorted({0, length, *starts, *ends})
        segments = tuple(itertools.pairwise(cuts))
        cover = tuple(
            tuple(i for i, (s, e) in enumerate(zip(starts, ends, strict=True)) if s <= a and b <= e) for a, b in segments
        )
        return cls(starts, segments, cover, _axis_weights(starts, tile, length))

    def of_tile(self, i: int) -> list[int]:
        return [j for j, tiles in enumerate(self.cover) if i in tiles]


def _channels_last(block: torch.Tensor) -> torch.Tensor:
    return block.permute(1, 2, 0)


class TileBlender:
    """Blends tile outputs into one frame while holding only the overlaps (see the module notes).

    Args:
        grid: the tiles.
        finish: a final blended block ``[C, h, w]`` -> the output block ``[h, w, ...]`` (e.g.
            argmax to labels, or re-normalisation), written into the output ``[H, W, ...]``.
            Default: channels last.

    Tiles may be added in any order; each must be added once. A cell's contributions are
    summed in the order its tiles arrive, so the same order gives bit-identical results.
    """

    def __init__(self, grid: TileGrid, *, finish: Callable[[torch.Tensor], torch.Tensor] = _channels_last) -> None:
        self.grid = grid
        self.finish = finish
        self.y = _Axis.of(grid.ys, grid.tile[0], grid.height)
        self.x = _Axis.of(grid.xs, grid.tile[1], grid.width)
        self._pending: dict[tuple[int, int], list] = {}  # cell -> [weighted sum, weight sum, tiles in]
        self._seen: set[int] = set()
        self._out: torch.Tensor | None = None
        self.peak_pending_bytes = 0

    def add(self, index: int, out: torch.Tensor) -> None:
        """Absorb tile ``index``'s output ``[C, th, tw]`` (float, at the tile's resolution)."""
        if index in self._seen or not 0 <= index < len(self.grid):
            raise ValueError(f"tile {index} added twice or outside the grid of {len(self.grid)}")
        self._seen.add(index)
        r, c = divmod(index, len(self.x.starts))
        y0, x0 = self.y.starts[r], self.x.starts[c]
        wy = self.y.weights[r].to(device=out.device, dtype=torch.float32)
        wx = self.x.weights[c].to(device=out.device, dtype=torch.float32)
        for j in self.y.of_tile(r):
            ya, yb = self.y.segments[j]
            for k in self.x.of_tile(c):
                xa, xb = self.x.segments[k]
                piece = out[:, ya - y0 : yb - y0, xa - x0 : xb - x0].float()  # [C, h, w]
                need = len(self.y.cover[j]) * len(self.x.cover[k])
                if need == 1:
                    self._write(ya, xa, piece)
                    continue
                w = wy[ya - y0 : yb - y0, None] * wx[None, xa - x0 : xb - x0]  # [h, w]
                cell = self._pending.get((j, k))
                if cell is None:
                    cell = self._pending[(j, k)] = [piece * w, w.clone(), 1]
                else:
                    cell[0] += piece * w
                    cell[1] += w
                    cell[2] += 1
                if cell[2] == need:
                    del self._pending[(j, k)]
                    self._write(ya, xa, cell[0] / cell[1])
        held = sum(t.numel() * t.element_size() for cell in self._pending.values() for t in cell[:2])
        self.peak_pending_bytes = max(self.peak_pending_bytes, held)

    def _write(self, y: int, x: int, block: torch.Tensor) -> None:
        final = self.finish(block)  # [h, w, ...]
        if self._out is None:
            shape = (self.grid.height, self.grid.width, *final.shape[2:])
            self._out = torch.empty(shape, dtype=final.dtype, device=final.device)
        self._out[y : y + final.shape[0], x : x + final.shape[1]] = final

    def result(self) -> torch.Tensor:
        """The output ``[H, W, ...]``; every tile must have been added."""
        if len(self._seen) != len(self.grid) or self._out is None:
            raise ValueError(f"only {len(self._seen)} of {len(self.grid)} tiles were added")
        return self._out


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
        out_device: where the blended output lives (default: the frame's device).

    Returns:
        ``[C_out, H, W]`` float32 weighted mean of the tile outputs.
    """
    c, height, width = frame.shape
    th, tw = tile
    grid = tile_grid(height, width, tile, overlap)
    out_device = torch.device(out_device) if out_device is not None else frame.device
    blender = TileBlender(grid)
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
        for i in range(len(chunk)):
            blender.add(first + i, outs[i])
    return blender.result().permute(2, 0, 1).contiguous()
