"""Top-down pose crops: box geometry, the UDP affine warp and the training pipeline (spec §2.1).

Coordinates are image pixels with pixel centres at integers; boxes are ``xyxy``; a crop is
described by its ``center`` (x, y) and ``box_size`` (w, h) in image pixels, after the aspect
of the box has been expanded to the input's W/H. The UDP warp maps the box edges onto the
first and last pixel centres of the crop:

    q = diag((W - 1) / w, (H - 1) / h) . R(theta) . (p - center) + ((W - 1) / 2, (H - 1) / 2)

and the decoder maps crop coordinates back with ``center``, ``box_size`` (inference spec §4.7).
Geometry is float32 like the released pipeline.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from sapiens2_cli.train import photometric as photo
from sapiens2_cli.train.keypoints import KeypointSet
from sapiens2_cli.train.task_config import PoseAugment

__all__ = [
    "box_to_center_size",
    "fix_aspect",
    "pose_train",
    "pose_val",
    "truncated_normal",
    "udp_warp_matrix",
    "warp_crop",
]


def box_to_center_size(box_xyxy: np.ndarray, padding: float) -> tuple[np.ndarray, np.ndarray]:
    """``center = ((x1 + x2) / 2, (y1 + y2) / 2)``, ``size = (x2 - x1, y2 - y1) * padding``."""
    box = np.asarray(box_xyxy, dtype=np.float32)
    center = np.array([(box[0] + box[2]) * 0.5, (box[1] + box[3]) * 0.5], dtype=np.float32)
    size = np.array([box[2] - box[0], box[3] - box[1]], dtype=np.float32) * np.float32(padding)
    return center, size


def fix_aspect(size: np.ndarray, aspect: float) -> np.ndarray:
    """Expand ``(w, h)`` to ``w / h = aspect`` (never shrink)."""
    w, h = np.float32(size[0]), np.float32(size[1])
    aspect = np.float32(aspect)
    if w > h * aspect:
        return np.array([w, w / aspect], dtype=np.float32)
    return np.array([h * aspect, h], dtype=np.float32)


def udp_warp_matrix(
    center: np.ndarray, box_size: np.ndarray, rotation: float, output_wh: tuple[int, int]
) -> np.ndarray:
    """``[2, 3]`` float32 affine matrix image -> crop (module docstring); rotation in degrees."""
    out_w, out_h = output_wh
    ax = np.float32(out_w - 1) / np.float32(box_size[0])
    ay = np.float32(out_h - 1) / np.float32(box_size[1])
    theta = math.radians(rotation)
    cos, sin = np.float32(math.cos(theta)), np.float32(math.sin(theta))
    linear = np.array([[ax * cos, ax * sin], [-ay * sin, ay * cos]], dtype=np.float32)
    offset = np.array([(out_w - 1) / 2, (out_h - 1) / 2], dtype=np.float32) - linear @ np.asarray(
        center, np.float32
    )
    return np.concatenate([linear, offset[:, None]], axis=1).astype(np.float32)


def warp_crop(image: np.ndarray, matrix: np.ndarray, output_wh: tuple[int, int]) -> np.ndarray:
    """``cv2.warpAffine`` with INTER_AREA (bilinear inside warpAffine) when the warp shrinks,
    INTER_CUBIC when it enlarges; border 0."""
    scale = min(np.hypot(matrix[0, 0], matrix[0, 1]), np.hypot(matrix[1, 0], matrix[1, 1]))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    return cv2.warpAffine(
        image, matrix, output_wh, flags=interp, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    )


def truncated_normal(rng: np.random.Generator, size: int | None = None) -> np.ndarray | float:
    """Standard normal samples restricted to [-1, 1] (rejection sampling)."""
    count = 1 if size is None else size
    out = np.empty(count)
    filled = 0
    while filled < count:
        draw = rng.standard_normal(count)
        draw = draw[np.abs(draw) <= 1][: count - filled]
        out[filled : filled + len(draw)] = draw
        filled += len(draw)
    return float(out[0]) if size is None else out


def _visible_box(
    keypoints: np.ndarray, visible: np.ndarray, image_wh: tuple[int, int]
) -> np.ndarray:
    w, h = image_wh
    if not visible.any():
        return np.array([0, 0, w - 1, h - 1], dtype=np.float32)
    pts = keypoints[visible > 0]
    x1, y1 = pts.min(0)
    x2, y2 = pts.max(0)
    return np.clip(np.array([x1, y1, x2, y2], dtype=np.float32), 0, [w - 1, h - 1, w - 1, h - 1])


def _half_body(keypoints, visible, kset: KeypointSet, cfg, aspect, rng):
    """New (center, size) around the upper or lower body, or None."""
    vis = visible > 0
    if vis.sum() < cfg.min_keypoints:
        return None
    upper = kset.upper[vis[kset.upper]]
    lower = kset.lower[vis[kset.lower]]
    if rng.random() < cfg.upper_prob and len(upper) >= cfg.min_upper:
        chosen = upper
    elif len(lower) >= cfg.min_lower:
        chosen = lower
    elif len(upper) >= cfg.min_upper:
        chosen = upper
    else:
        return None
    pts = keypoints[chosen].astype(np.float32)
    center = pts.mean(0)
    extent = pts.max(0) - pts.min(0)
    return center.astype(np.float32), fix_aspect(extent, aspect) * np.float32(cfg.padding)


def pose_train(
    image: np.ndarray,
    keypoints: np.ndarray,
    visible: np.ndarray,
    box_xyxy: np.ndarray,
    rng: np.random.Generator,
    cfg: PoseAugment,
    *,
    input_size: tuple[int, int],
    keypoint_set: KeypointSet,
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Augmented crop of one instance.

    Args:
        image: uint8 BGR ``[H, W, 3]``; keypoints ``[K, 2]`` image px; visible ``[K]`` 0/1;
        box_xyxy: the instance box.
        input_size: network input ``(H, W)``.

    Returns:
        ``(crop [H, W, 3] uint8, keypoints [K, 2] crop px, visible [K])`` or None when fewer
        than ``cfg.min_visible_after`` keypoints remain visible.
    """
    out_h, out_w = input_size
    aspect = out_w / out_h
    img_h, img_w = image.shape[:2]
    keypoints = keypoints.astype(np.float32).copy()
    visible = visible.astype(np.float32).copy()
    center, size = box_to_center_size(box_xyxy, cfg.bbox_padding)

    if rng.random() < cfg.flip.p:
        image = image[:, ::-1]
        keypoints[:, 0] = img_w - 1 - keypoints[:, 0]
        flipped = np.empty_like(keypoints)
        flipped_vis = np.empty_like(visible)
        flipped[keypoint_set.flip_index] = keypoints
        flipped_vis[keypoint_set.flip_index] = visible
        keypoints, visible = flipped, flipped_vis
        center = np.array([img_w - 1 - center[0], center[1]], dtype=np.float32)

    if rng.random() < cfg.half_body.p:
        half = _half_body(keypoints, visible, keypoint_set, cfg.half_body, aspect, rng)
        if half is not None:
            center, size = half

    jitter = cfg.box_jitter
    if rng.random() < jitter.shift_p:
        center = (
            center + truncated_normal(rng, 2).astype(np.float32) * np.float32(jitter.shift) * size
        )
    size = size * np.float32(1 + jitter.scale * truncated_normal(rng))
    rotation = (
        jitter.rotate_degrees * truncated_normal(rng) if rng.random() < jitter.rotate_p else 0.0
    )

    size = fix_aspect(size, aspect)
    matrix = udp_warp_matrix(center, size, rotation, (out_w, out_h))
    crop = warp_crop(np.ascontiguousarray(image), matrix, (out_w, out_h))
    keypoints = keypoints @ matrix[:, :2].T + matrix[:, 2]
    inside = (
        (keypoints[:, 0] >= 0)
        & (keypoints[:, 0] < out_w)
        & (keypoints[:, 1] >= 0)
        & (keypoints[:, 1] < out_h)
    )
    visible = visible * inside
    keypoints[visible == 0] = 0

    crop = photo.photometric_distortion(crop, rng, cfg.photometric)
    crop = photo.box_blur(crop, rng, cfg.blur)
    crop = photo.median_blur(crop, rng, cfg.median_blur)
    crop = photo.coarse_dropout(crop, rng, cfg.coarse_dropout)
    if (visible > 0).sum() < cfg.min_visible_after:
        return None
    return crop, keypoints, visible


def pose_val(
    image: np.ndarray, box_xyxy: np.ndarray, *, input_size: tuple[int, int], padding: float = 1.25
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unaugmented crop: ``(crop [H, W, 3], center [2], box_size [2])`` (aspect-fixed size)."""
    out_h, out_w = input_size
    center, size = box_to_center_size(box_xyxy, padding)
    size = fix_aspect(size, out_w / out_h)
    matrix = udp_warp_matrix(center, size, 0.0, (out_w, out_h))
    return warp_crop(image, matrix, (out_w, out_h)), center, size
