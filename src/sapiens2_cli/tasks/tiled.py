"""Tiled dense prediction (``--tile``) for frames larger than the model input.

``--tile off`` (the default) keeps the official path: the whole image resized to the model
input and the output resized back. ``--tile auto`` tiles an image when either side exceeds
:data:`AUTO_FACTOR` times the model input's side (1.5: a 1536-pixel side for a 1024x768 model);
``--tile HxW`` tiles every image larger than an ``HxW`` tile on either side and runs the model
at ``HxW``. Tiles are crops of the image at its own resolution (the model's native pixel
scale, nothing is resized), overlapping by at least ``--tile-overlap`` pixels (default: a
quarter of the tile's shorter side), and blended with smooth weights
(:class:`~sapiens2_cli.tiling.TileBlender`). An image narrower than a tile on one axis is
padded with black on that axis (bottom / right), as the official padding does.

What each task blends (:class:`TileRule`, set as ``Task.tile_rule``):

* seg: the tiles' logits; the argmax is taken at full resolution after blending;
* normal: each tile's normals are normalised, blended, and re-normalised after blending;
* albedo: each tile's albedo is clamped to [0, 1] and blended (a weighted mean stays in range);
* pointmap cannot be tiled: it predicts one scale, hence one camera, per model input, so every
  tile would get its own focal length and depth scale and the tiles would not agree. It keeps
  the whole-frame path (``--tile auto`` leaves it there; ``--tile HxW`` is refused).

A model whose output is coarser than its input (the heads on the 4K backbone) has each tile's
output resized bilinearly to the tile before blending.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal

import cv2
import numpy as np
import torch

from sapiens2_cli.tasks.base import ModelInput, Prediction, Raw
from sapiens2_cli.tiling import TileBlender, TileGrid, tile_grid
from sapiens2_cli.transforms import resize_bilinear

AUTO_FACTOR = 1.5  # --tile auto: tile when a side exceeds this many times the model input's side
TileMode = Literal["off", "auto"] | tuple[int, int]


@dataclasses.dataclass(frozen=True)
class TileRule:
    """How a dense task's tiles become one prediction.

    ``per_tile``: one tile's raw output ``[C, th, tw]`` -> the map that is blended (normalised,
    clamped...); ``finish``: a blended block ``[C, h, w]`` -> its final ``[h, w]`` or
    ``[h, w, C']`` values; the full map of those is the prediction's ``key``.
    """

    key: str
    per_tile: Callable[[torch.Tensor], torch.Tensor]
    finish: Callable[[torch.Tensor], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class TileGeometry:
    """A model input that is tile ``index`` of ``grid`` (origin ``grid``'s ys / xs, in image pixels)."""

    index: int
    grid: TileGrid


def default_overlap(tile_hw: tuple[int, int]) -> int:
    """A quarter of the tile's shorter side, in pixels."""
    return min(tile_hw) // 4


@dataclasses.dataclass(frozen=True)
class Tiler:
    """Tiles for one task: ``tile_hw`` (the model input of every tile), ``overlap`` pixels,
    and the size above which an image is tiled (``threshold`` times the tile's side)."""

    rule: TileRule
    tile_hw: tuple[int, int]
    overlap: int
    threshold: float

    def applies(self, image_hw: tuple[int, int]) -> bool:
        return image_hw[0] > self.threshold * self.tile_hw[0] or image_hw[1] > self.threshold * self.tile_hw[1]

    def prepare(self, image: np.ndarray) -> list[ModelInput]:
        """The tiles of a ``[H, W, 3]`` uint8 BGR image, row-major (crops, padded with black when
        the image is smaller than a tile on an axis)."""
        grid = tile_grid(image.shape[0], image.shape[1], self.tile_hw, self.overlap)
        th, tw = self.tile_hw
        inputs = []
        for index, (y, x) in enumerate(grid.origins()):
            crop = image[y : y + th, x : x + tw]
            if crop.shape[:2] != (th, tw):
                crop = cv2.copyMakeBorder(crop, 0, th - crop.shape[0], 0, tw - crop.shape[1],
                                          cv2.BORDER_CONSTANT, value=(0, 0, 0))  # fmt: skip
            inputs.append(ModelInput(crop, TileGeometry(index, grid)))
        return inputs

    def describe(self) -> dict:
        return {"tile_hw": list(self.tile_hw), "overlap": self.overlap, "threshold": self.threshold}


def make_tiler(rule: TileRule | None, mode: TileMode, overlap: int | None, input_hw: tuple[int, int]) -> Tiler | None:
    """The tiler of one task for ``--tile mode`` (None: the task is not tiled).

    Raises:
        ValueError: the overlap does not fit the tile.
    """
    if mode == "off" or rule is None:
        return None
    tile = tuple(input_hw) if mode == "auto" else tuple(mode)
    overlap = default_overlap(tile) if overlap is None else overlap
    if not 0 <= overlap < min(tile):
        raise ValueError(f"--tile-overlap {overlap} must be at least 0 and below the tile's shorter side ({min(tile)})")
    return Tiler(rule, tile, overlap, AUTO_FACTOR if mode == "auto" else 1.0)


class TiledAccumulator:
    """Absorbs an image's tile outputs as they come (only their overlaps are held) and gives
    the blended prediction at the end."""

    def __init__(self, rule: TileRule, grid: TileGrid) -> None:
        self.rule = rule
        self.grid = grid
        self.blender = TileBlender(grid, finish=rule.finish)

    @classmethod
    def of(cls, rule: TileRule | None, inputs: list[ModelInput]) -> TiledAccumulator | None:
        """An accumulator when ``inputs`` are tiles, else None."""
        if rule is None or not inputs or not isinstance(inputs[0].geometry, TileGeometry):
            return None
        return cls(rule, inputs[0].geometry.grid)

    def add(self, index: int, raw: Raw) -> None:
        """Tile ``index``'s raw output (float32, on the model's device)."""
        out = self.rule.per_tile(raw)  # [C, h, w]
        if tuple(out.shape[-2:]) != self.grid.tile:
            out = resize_bilinear(out[None], self.grid.tile)[0]
        self.blender.add(index, out)

    def result(self) -> Prediction:
        return {self.rule.key: self.blender.result().cpu().numpy()}
