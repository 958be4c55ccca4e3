"""Pointmap: metric X, Y, Z of each pixel in the camera frame, plus the implied focal length.

Pre-processing keeps the aspect ratio and zero-pads. The raw canonical XYZ is divided by the
predicted scale, the padding cropped, and the map resized to the image: when it grows in
either dimension it is first blurred four times (3x3 Gaussian, sigma 0.8, reflect border),
as the official demo does. The model's canonical camera has a focal length of 768 network-input
pixels and ``scale = 768 / f``, so ``f = 768 / scale`` input pixels, ``f / s`` image pixels with
``s`` the resize factor of the pre-processing (derived; the demo writes no intrinsics, and the
principal point is not predicted).

Outputs: ``OUT/pointmap/<rel>.exr`` float32 channels ``X, Y, Z`` in metres (X right, Y down,
Z forward; ``--format npy``: ``[H, W, 3]``), and ``OUT/pointmap/<rel>.json`` with the scale
and focal lengths.
"""

from __future__ import annotations

import cv2
import numpy as np

from sapiens2_cli import transforms
from sapiens2_cli.models.heads import pointmap_scale_inputs
from sapiens2_cli.models.sapiens2 import Sapiens2Model
from sapiens2_cli.tasks.base import VIS_FILE, FileSpec, ModelInput, OutputFormat, Prediction, Raw, Task, side_by_side
from sapiens2_cli.writers import FileData

CHANNELS = ("X", "Y", "Z")
CANONICAL_FOCAL_PX = 768.0  # network-input pixels, fixed by the training configs
META_FILE = FileSpec(".json", "json")
DEPTH_RANGE_M = (1e-6, 250.0)  # the demo's bounds for its inverse-depth colouring
BACKGROUND_BGR = (100, 100, 100)


def depth_to_bgr(depth: np.ndarray) -> np.ndarray:
    """``[H, W]`` depth (metres) -> turbo-coloured inverse depth, uint8 BGR.

    As the demo, per image: bounds from the 1st / 99th depth percentiles of pixels with
    positive depth; near is red, far is blue; non-positive depth is grey.
    """
    valid = np.isfinite(depth) & (depth > 0)
    out = np.empty((*depth.shape, 3), np.uint8)
    out[:] = BACKGROUND_BGR
    if not valid.any():
        return out
    near, far = np.percentile(depth[valid], [1, 99])
    inv = 1.0 / np.maximum(depth[valid], DEPTH_RANGE_M[0])
    inv_hi = min(1.0 / max(near, DEPTH_RANGE_M[0]), 10.0)
    inv_lo = max(1.0 / DEPTH_RANGE_M[1], 1.0 / max(far, DEPTH_RANGE_M[0]))
    t = np.clip((inv - inv_lo) / max(inv_hi - inv_lo, 1e-12), 0.0, 1.0)
    colours = cv2.applyColorMap((t * 255).astype(np.uint8)[:, None], cv2.COLORMAP_TURBO)  # [N, 1, 3]
    out[valid] = colours[:, 0]
    return out


class PointmapTask(Task):
    name = "pointmap"
    tile_refusal = (
        "the model predicts one scale, hence one camera, per input, so each tile would get its own "
        "focal length and depth scale and the tiles would not fit together; run it on the whole frame "
        "(--tile off or auto: the frame is resized to the model input and the pointmap upsampled)"
    )

    def files(self, fmt: OutputFormat, vis: bool) -> list[FileSpec]:
        main = FileSpec(".npy", "npy") if fmt == "npy" else FileSpec(".exr", "exr")
        return [main, META_FILE, VIS_FILE] if vis else [main, META_FILE]

    def check_input_size(self, model: Sapiens2Model, input_hw: tuple[int, int]) -> None:
        super().check_input_size(model, input_hw)
        head = model.info.head
        stride = model.info.arch.stride if model.info.arch is not None else 16
        grid = (input_hw[0] // stride, input_hw[1] // stride)
        given = pointmap_scale_inputs(head.scale_conv_out_channels[-1], grid, len(head.scale_conv_out_channels))
        if given != head.scale_mlp[0]:
            raise ValueError(
                f"this pointmap model's scale branch takes {head.scale_mlp[0]} features but a "
                f"{input_hw[0]}x{input_hw[1]} input gives {given}: pointmap models only run "
                "at the input size they were built for (pass it with --input-size HxW)"
            )

    def prepare(self, image: np.ndarray, input_hw: tuple[int, int]) -> list[ModelInput]:
        pixels, placement = transforms.resize_pad(image, input_hw)
        return [ModelInput(pixels, placement)]

    def postprocess(self, raws: list[Raw], inputs: list[ModelInput], image_hw: tuple[int, int]) -> Prediction:
        ((xyz, scale),) = raws  # [3, H_in, W_in] canonical, [1]
        placement = inputs[0].geometry
        p = transforms.crop_content(xyz / scale, placement)[None]  # [1, 3, h, w] metres
        p = transforms.smooth_resize(p, image_hw)[0]  # [3, H, W]
        s = float(scale.reshape(()))
        focal_input = CANONICAL_FOCAL_PX / s
        meta = {
            "format_version": 1,
            "units": "metres",
            "frame": "camera: X right, Y down, Z forward",
            "scale": s,
            "focal_length_px": focal_input / placement.scale,
            "focal_length_input_px": focal_input,
            "canonical_focal_length_input_px": CANONICAL_FOCAL_PX,
            "image_size_hw": list(image_hw),
            "input_size_hw": list(placement.input_hw),
            "resize_factor": placement.scale,
        }
        return {"points": p.permute(1, 2, 0).contiguous().cpu().numpy(), "meta": meta}  # [H, W, 3]

    def render(self, pred: Prediction, image: np.ndarray, fmt: OutputFormat, vis: bool) -> dict[FileSpec, FileData]:
        main, *_ = self.files(fmt, vis)
        out = {main: FileData(main.kind, pred["points"], CHANNELS), META_FILE: FileData("json", pred["meta"])}
        if vis:
            out[VIS_FILE] = FileData("jpg", side_by_side(image, depth_to_bgr(pred["points"][..., 2])))
        return out

