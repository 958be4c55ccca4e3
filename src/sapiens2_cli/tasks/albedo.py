"""Albedo: the reflectance colour of each pixel, RGB in [0, 1].

Pre-processing keeps the aspect ratio and zero-pads. The raw output is clamped to [0, 1] at
model resolution, cropped and resized bilinearly to the image, as in the official demo.
Outputs ``OUT/albedo/<rel>.exr`` (float32 ``R, G, B``, the predicted values as they are; the
upstream code does not state a transfer function, the EXR convention is linear) and
``OUT/albedo/<rel>.png``: 8-bit RGB ``trunc(255 * albedo)``, the demo's quantisation.
``--format npy`` writes ``[H, W, 3]`` float32 RGB instead of the EXR. Tiled (``--tile``): each
tile is clamped, then the tiles are blended.
"""

from __future__ import annotations

import numpy as np
import torch

from sapiens2_cli import transforms
from sapiens2_cli.tasks.base import VIS_FILE, FileSpec, ModelInput, OutputFormat, Prediction, Raw, Task, side_by_side
from sapiens2_cli.tasks.tiled import TileRule
from sapiens2_cli.writers import FileData

CHANNELS = ("R", "G", "B")
PNG_FILE = FileSpec(".png", "png")


def albedo_to_bgr(albedo: np.ndarray) -> np.ndarray:
    """``[H, W, 3]`` RGB in [0, 1] -> uint8 BGR ``trunc(255 * albedo)`` (written as RGB on disk)."""
    return np.ascontiguousarray((albedo * 255.0).astype(np.uint8)[..., ::-1])


def _clamp(a: torch.Tensor) -> torch.Tensor:
    return a.clamp(0.0, 1.0)


def _tile_finish(a: torch.Tensor) -> torch.Tensor:
    return a.clamp(0.0, 1.0).permute(1, 2, 0)  # [h, w, 3]; the clamp only absorbs rounding


class AlbedoTask(Task):
    name = "albedo"
    tile_rule = TileRule("albedo", per_tile=_clamp, finish=_tile_finish)

    def files(self, fmt: OutputFormat, vis: bool) -> list[FileSpec]:
        main = FileSpec(".npy", "npy") if fmt == "npy" else FileSpec(".exr", "exr")
        return [main, PNG_FILE, VIS_FILE] if vis else [main, PNG_FILE]

    def prepare(self, image: np.ndarray, input_hw: tuple[int, int]) -> list[ModelInput]:
        pixels, placement = transforms.resize_pad(image, input_hw)
        return [ModelInput(pixels, placement)]

    def postprocess(self, raws: list[Raw], inputs: list[ModelInput], image_hw: tuple[int, int]) -> Prediction:
        (a,) = raws  # [3, H_in, W_in] RGB, not clamped
        a = transforms.crop_content(a.clamp(0.0, 1.0), inputs[0].geometry)[None]  # [1, 3, h, w]
        a = transforms.resize_bilinear(a, image_hw)[0]  # [3, H, W]
        return {"albedo": a.permute(1, 2, 0).contiguous().cpu().numpy()}  # [H, W, 3]

    def render(self, pred: Prediction, image: np.ndarray, fmt: OutputFormat, vis: bool) -> dict[FileSpec, FileData]:
        main, *_ = self.files(fmt, vis)
        bgr = albedo_to_bgr(pred["albedo"])
        out = {main: FileData(main.kind, pred["albedo"], CHANNELS), PNG_FILE: FileData("png", bgr)}
        if vis:
            out[VIS_FILE] = FileData("jpg", side_by_side(image, bgr))
        return out
