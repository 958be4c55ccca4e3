"""Backbone features (``--task pretrain``): the feature map and the class token of each image.

Pre-processing keeps the aspect ratio and zero-pads to the model input (as normal / albedo /
pointmap do); the backbone runs at the input size (the 4K model, ``pretrain-1b-4k``, natively
at 4096x3072: its windowed tokenizer pools 4x4 patches, so the input must be a multiple of 64
and a feature cell covers 64x64 input pixels). The whole feature grid is kept, padding cells
included; the JSON / metadata says where the image lies in it.

Outputs (features as float32, exactly what the backbone gives):

* default / ``--format npy``: ``OUT/pretrain/<rel>.npy`` ``[D, h, w]`` and
  ``OUT/pretrain/<rel>.json`` (geometry);
* ``--format safetensors``: ``OUT/pretrain/<rel>.safetensors`` with tensors ``features``
  ``[D, h, w]`` and ``cls`` ``[D]``, and the geometry JSON as the ``geometry`` metadata string.

``--vis`` shows the first three principal components of the features as RGB beside the image.
"""

from __future__ import annotations

import json
from typing import Any

import cv2
import numpy as np
import torch

from sapiens2_cli import transforms
from sapiens2_cli.models.sapiens2 import Sapiens2Model
from sapiens2_cli.tasks.base import VIS_FILE, FileSpec, ModelInput, OutputFormat, Prediction, Raw, Task, side_by_side
from sapiens2_cli.writers import FileData

NPY_FILE = FileSpec(".npy", "npy")
META_FILE = FileSpec(".json", "json")
SAFETENSORS_FILE = FileSpec(".safetensors", "safetensors")


def pca_rgb(features: np.ndarray) -> np.ndarray:
    """``[D, h, w]`` features -> ``[h, w, 3]`` uint8 BGR: the first three principal components
    (over the cells of this image), each stretched to 0..255 between its 1st and 99th percentiles."""
    d, h, w = features.shape
    x = torch.from_numpy(features).reshape(d, h * w).T.double()  # [N, D]
    x = x - x.mean(dim=0, keepdim=True)
    _, _, v = torch.linalg.svd(x, full_matrices=False)  # v: [min(N, D), D]
    comps = (x @ v[:3].T).numpy()  # [N, k], k <= 3
    rgb = np.zeros((h * w, 3))
    for i in range(comps.shape[1]):
        lo, hi = np.percentile(comps[:, i], [1, 99])
        rgb[:, i] = np.clip((comps[:, i] - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    return np.ascontiguousarray((rgb.reshape(h, w, 3) * 255).astype(np.uint8)[..., ::-1])


class PretrainTask(Task):
    name = "pretrain"
    formats = ("npy", "safetensors")
    tile_refusal = "features are taken from the whole frame (use the 4K backbone, pretrain-1b-4k, for large frames)"

    def files(self, fmt: OutputFormat, vis: bool) -> list[FileSpec]:
        main = [SAFETENSORS_FILE] if fmt == "safetensors" else [NPY_FILE, META_FILE]
        return [*main, VIS_FILE] if vis else main

    def prepare(self, image: np.ndarray, input_hw: tuple[int, int]) -> list[ModelInput]:
        pixels, placement = transforms.resize_pad(image, input_hw)
        return [ModelInput(pixels, placement)]

    def forward(self, model: Sapiens2Model, x: torch.Tensor) -> Any:
        """``([B, D, h, w] feature map, [B, D] class token)``, both after the final norm."""
        backbone = model.backbone
        tokens, (h, w) = backbone.forward_tokens(x)  # [B, 1 + S + h*w, D]
        b, _, d = tokens.shape
        features = tokens[:, backbone.num_prefix :].transpose(1, 2).reshape(b, d, h, w)
        return features, tokens[:, 0]

    def postprocess(self, raws: list[Raw], inputs: list[ModelInput], image_hw: tuple[int, int]) -> Prediction:
        ((features, cls),) = raws  # [D, h, w], [D]
        placement = inputs[0].geometry
        (h_in, w_in), (h, w) = placement.input_hw, tuple(features.shape[-2:])
        meta = {
            "format_version": 1,
            "features_shape": list(features.shape),
            "dtype": "float32",
            "image_size_hw": list(image_hw),
            "input_size_hw": [h_in, w_in],
            "grid_hw": [h, w],
            "stride": h_in // h,
            "content_box_input_px": {"top": placement.top, "left": placement.left,
                                     "height": placement.content_hw[0], "width": placement.content_hw[1]},
            "resize_factor": placement.scale,
            "mapping": "cell (i, j) covers input pixels [i*stride, (i+1)*stride) x [j*stride, (j+1)*stride); "
                       "image pixel (y, x) lies at input pixel (top + y * resize_factor, left + x * resize_factor)",
        }  # fmt: skip
        return {"features": features.cpu().numpy(), "cls": cls.cpu().numpy(), "meta": meta}

    def render(self, pred: Prediction, image: np.ndarray, fmt: OutputFormat, vis: bool) -> dict[FileSpec, FileData]:
        if fmt == "safetensors":
            tensors = {"features": pred["features"], "cls": pred["cls"]}
            out = {SAFETENSORS_FILE: FileData("safetensors", {"tensors": tensors, "metadata": {"geometry": json.dumps(pred["meta"])}})}
        else:
            out = {NPY_FILE: FileData("npy", pred["features"]), META_FILE: FileData("json", pred["meta"])}
        if vis:
            out[VIS_FILE] = FileData("jpg", side_by_side(image, self.panel(pred, image.shape[:2])))
        return out

    @staticmethod
    def panel(pred: Prediction, image_hw: tuple[int, int]) -> np.ndarray:
        """The PCA colours of the cells over the image area, nearest-neighbour upsampled to ``image_hw``."""
        meta = pred["meta"]
        h_in, w_in = meta["input_size_hw"]
        rgb = cv2.resize(pca_rgb(pred["features"]), (w_in, h_in), interpolation=cv2.INTER_NEAREST)
        box = meta["content_box_input_px"]
        rgb = rgb[box["top"] : box["top"] + box["height"], box["left"] : box["left"] + box["width"]]
        return cv2.resize(rgb, (image_hw[1], image_hw[0]), interpolation=cv2.INTER_NEAREST)
