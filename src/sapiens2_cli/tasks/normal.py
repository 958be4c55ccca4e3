"""Surface normals: a unit vector per pixel in the camera frame.

Pre-processing keeps the aspect ratio and zero-pads (:func:`transforms.resize_pad`). The raw
output is divided by its per-pixel L2 norm (clamped at 1e-8) at model resolution, the padding
is cropped and the map resized bilinearly to the image; vectors are not re-normalised after
the resize (interpolated ones can be slightly shorter than 1), as in the official demo.
Output ``OUT/normal/<rel>.exr``: float32 channels ``X, Y, Z`` as the model predicts them
(X points to the image's right; the Y / Z signs are the model's own convention, not stated
upstream). ``--format npy``: ``[H, W, 3]`` float32 in that order. Tiled (``--tile``): each tile is
normalised, the tiles blended, and the blend normalised again (unit vectors everywhere).
"""

from __future__ import annotations

import numpy as np
import torch

from sapiens2_cli import transforms
from sapiens2_cli.tasks.base import VIS_FILE, FileSpec, ModelInput, OutputFormat, Prediction, Raw, Task, side_by_side
from sapiens2_cli.tasks.tiled import TileRule
from sapiens2_cli.writers import FileData

CHANNELS = ("X", "Y", "Z")
NORM_EPS = 1e-8


def normals_to_bgr(normals: np.ndarray) -> np.ndarray:
    """``[H, W, 3]`` normals in [-1, 1] -> uint8 BGR image showing X as red, Y green, Z blue.

    ``uint8((n + 1) / 2 * 255)`` with truncation, the demo's mapping.
    """
    rgb = ((np.clip(normals, -1.0, 1.0) + 1.0) / 2.0 * 255.0).astype(np.uint8)
    return np.ascontiguousarray(rgb[..., ::-1])


def unit(n: torch.Tensor) -> torch.Tensor:
    """``[3, ...]`` vectors divided by their L2 norm (clamped at :data:`NORM_EPS`)."""
    return n / torch.linalg.vector_norm(n, dim=0, keepdim=True).clamp(min=NORM_EPS)


def _tile_finish(n: torch.Tensor) -> torch.Tensor:
    return unit(n).permute(1, 2, 0)  # [h, w, 3]


class NormalTask(Task):
    name = "normal"
    tile_rule = TileRule("normals", per_tile=unit, finish=_tile_finish)

    def files(self, fmt: OutputFormat, vis: bool) -> list[FileSpec]:
        main = FileSpec(".npy", "npy") if fmt == "npy" else FileSpec(".exr", "exr")
        return [main, VIS_FILE] if vis else [main]

    def prepare(self, image: np.ndarray, input_hw: tuple[int, int]) -> list[ModelInput]:
        pixels, placement = transforms.resize_pad(image, input_hw)
        return [ModelInput(pixels, placement)]

    def postprocess(self, raws: list[Raw], inputs: list[ModelInput], image_hw: tuple[int, int]) -> Prediction:
        (n,) = raws  # [3, H_in, W_in], not normalised
        n = unit(n)
        n = transforms.crop_content(n, inputs[0].geometry)[None]  # [1, 3, h, w]
        n = transforms.resize_bilinear(n, image_hw)[0]  # [3, H, W]
        return {"normals": n.permute(1, 2, 0).contiguous().cpu().numpy()}  # [H, W, 3]

    def render(self, pred: Prediction, image: np.ndarray, fmt: OutputFormat, vis: bool) -> dict[FileSpec, FileData]:
        main, *_ = self.files(fmt, vis)
        out = {main: FileData(main.kind, pred["normals"], CHANNELS)}
        if vis:
            out[VIS_FILE] = FileData("jpg", side_by_side(image, normals_to_bgr(pred["normals"])))
        return out
