"""Pre- and post-processing of the RTMDet person detector, as the Sapiens2 pose demo runs it.

* :func:`letterbox`: BGR uint8 image -> 640x640 canvas (aspect-preserving bilinear resize,
  image at the top-left, padding value 114) and the per-axis scale factors.
* :func:`normalize`: canvases -> network input (BGR order, ImageNet statistics listed as BGR).
* :func:`decode_detections`: per-level head outputs -> at most 100 boxes in original-image
  pixels (``score > 0.05``, best 1000 per level, no NMS, best 100 overall).
* :func:`kept_person_rows`: the demo's final filter (``score > 0.3`` then greedy NMS at
  IoU 0.3 with the inclusive "+1" pixel convention).

Boxes are ``xyxy`` in pixels throughout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from sapiens2_cli.tasks.bboxes import nms_xyxy

INPUT_SIZE = 640
PAD_VALUE = 114
MEAN_BGR = (103.53, 116.28, 123.675)
STD_BGR = (57.375, 57.12, 58.395)

# Detector test_cfg of the Sapiens2 config (no NMS inside the detector).
PRE_SCORE_THR = 0.05
NMS_PRE = 1000
MAX_PER_IMG = 100


@dataclass(frozen=True)
class Letterboxed:
    """One image placed on the detector canvas.

    ``canvas``: ``[640, 640, 3]`` uint8 BGR; ``scale_wh``: ``(new_w / W, new_h / H)``, the
    actual per-axis resize ratios; ``image_hw``: the original ``(H, W)``.
    """

    canvas: np.ndarray
    scale_wh: tuple[float, float]
    image_hw: tuple[int, int]


def check_image(image: np.ndarray, *, what: str = "image") -> None:
    """Raise ``ValueError`` unless ``image`` is an ``[H, W, 3]`` uint8 array with ``H, W > 0``."""
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{what} must be a numpy array (BGR uint8 H x W x 3), got {type(image)}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or image.size == 0:
        raise ValueError(
            f"{what} must be a BGR uint8 array of shape (H, W, 3) as cv2.imread returns, "
            f"got dtype {image.dtype} and shape {image.shape}"
        )


def letterbox(image_bgr: np.ndarray, *, size: int = INPUT_SIZE) -> Letterboxed:
    """Resize ``image_bgr [H, W, 3]`` uint8 to fit ``size x size`` and pad bottom/right with 114.

    The scale is ``size / max(H, W)`` and the new size is rounded half up
    (``int(W * s + 0.5)``); resizing uses OpenCV ``INTER_LINEAR`` for up- and downscaling.
    """
    check_image(image_bgr)
    h, w = image_bgr.shape[:2]
    s = min(size / max(h, w), size / min(h, w))
    # A side would only round to 0 for aspect ratios beyond 1:1280; keep one pixel there.
    new_w, new_h = max(int(w * s + 0.5), 1), max(int(h * s + 0.5), 1)
    resized = cv2.resize(
        np.ascontiguousarray(image_bgr), (new_w, new_h), interpolation=cv2.INTER_LINEAR
    )
    canvas = np.full((size, size, 3), PAD_VALUE, dtype=np.uint8)
    canvas[:new_h, :new_w] = resized
    return Letterboxed(canvas=canvas, scale_wh=(new_w / w, new_h / h), image_hw=(h, w))


def normalize(canvases: np.ndarray, *, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``[B, S, S, 3]`` uint8 BGR canvases -> ``[B, 3, S, S]`` input ``(x - mean) / std``.

    Channels stay in BGR order; the statistics are the ImageNet RGB ones listed as B, G, R.
    """
    x = torch.from_numpy(canvases).to(device).permute(0, 3, 1, 2).contiguous().float()
    mean = torch.tensor(MEAN_BGR, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD_BGR, device=device).view(1, 3, 1, 1)
    return ((x - mean) / std).to(dtype)


@dataclass(frozen=True)
class RawDetections:
    """The detector's own output for one image (before the demo's filter), score-descending.

    ``bboxes``: ``[N, 4]`` float32 xyxy in original-image pixels (not clipped to the image,
    may exceed ``W`` / ``H`` on the padded side); ``scores``: ``[N]`` float32 in ``(0.05, 1]``;
    ``bboxes_canvas``: ``[N, 4]`` the same boxes on the 640x640 canvas, clipped to it.
    ``N <= 100``.
    """

    bboxes: torch.Tensor
    scores: torch.Tensor
    bboxes_canvas: torch.Tensor


def decode_detections(
    cls_scores: Sequence[torch.Tensor],
    bbox_preds: Sequence[torch.Tensor],
    strides: Sequence[int],
    *,
    scale_wh: tuple[float, float],
    canvas_hw: tuple[int, int] = (INPUT_SIZE, INPUT_SIZE),
    score_thr: float = PRE_SCORE_THR,
    nms_pre: int = NMS_PRE,
    max_per_img: int = MAX_PER_IMG,
) -> RawDetections:
    """Turn one image's head outputs into scored boxes, exactly like mmdet with ``nms=None``.

    ``cls_scores[l]``: ``[1, H_l, W_l]`` logits; ``bbox_preds[l]``: ``[4, H_l, W_l]`` distances
    (left, top, right, bottom) in canvas pixels. Prior points sit at the cell's top-left corner
    ``(j * stride, i * stride)``. Per level: keep ``sigmoid > score_thr``, best ``nms_pre``.
    Then decode, clip to the canvas, multiply by ``float32(1 / scale)`` per axis, drop empty
    boxes, sort by score and keep ``max_per_img``.
    """
    level_scores, level_boxes = [], []
    for logits, dists, stride in zip(cls_scores, bbox_preds, strides, strict=True):
        width = logits.shape[-1]
        scores = logits.float().reshape(-1).sigmoid()  # [H*W], row-major (i outer, j inner)
        dists = dists.float().reshape(4, -1).T  # [H*W, 4]
        candidates = torch.nonzero(scores > score_thr).squeeze(1)
        kept, order = scores[candidates].sort(descending=True, stable=True)
        index = candidates[order[:nms_pre]]
        px = (index % width * stride).float()
        py = (torch.div(index, width, rounding_mode="floor") * stride).float()
        d = dists[index]
        level_boxes.append(
            torch.stack([px - d[:, 0], py - d[:, 1], px + d[:, 2], py + d[:, 3]], dim=-1)
        )
        level_scores.append(kept[:nms_pre])
    scores = torch.cat(level_scores)
    canvas = torch.cat(level_boxes)  # [M, 4]
    canvas_h, canvas_w = canvas_hw
    canvas[:, 0::2] = canvas[:, 0::2].clamp(0, canvas_w)
    canvas[:, 1::2] = canvas[:, 1::2].clamp(0, canvas_h)
    sw, sh = scale_wh
    inverse = torch.tensor([1 / sw, 1 / sh, 1 / sw, 1 / sh], device=canvas.device)
    boxes = canvas * inverse
    valid = (boxes[:, 2] - boxes[:, 0] > 0) & (boxes[:, 3] - boxes[:, 1] > 0)
    boxes, canvas, scores = boxes[valid], canvas[valid], scores[valid]
    scores, order = scores.sort(descending=True, stable=True)
    order = order[:max_per_img]
    return RawDetections(
        bboxes=boxes[order], scores=scores[:max_per_img], bboxes_canvas=canvas[order]
    )


def kept_person_rows(
    bboxes: np.ndarray, scores: np.ndarray, *, score_thr: float, nms_thr: float
) -> np.ndarray:
    """Rows the pose demo keeps: ``score > score_thr`` (strict), then the demo's greedy NMS.

    ``bboxes [N, 4]``, ``scores [N]`` float32 -> kept row indices ``[K]`` int64 into the
    inputs, highest score first.
    """
    above = np.flatnonzero(scores > np.float32(score_thr))
    kept = nms_xyxy(bboxes[above], scores[above], nms_thr)
    return above[kept].astype(np.int64)
