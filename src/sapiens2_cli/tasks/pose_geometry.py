"""Top-down pose geometry: person box -> UDP affine crop, and keypoints back to image pixels.

Conventions: boxes are ``xyxy`` in image pixels; sizes are ``(H, W)`` unless named ``_wh``;
points are ``(x, y)``. The forward path (box -> crop) is float32 arithmetic throughout, as in
the official pipeline: doing it in float64 changes a few crop pixels by one grey level, which
moves decoded keypoints by ~0.1 px. The inverse path (crop/heatmap -> image) is float64.

The forward map is the UDP ("unbiased data processing") affine: the padded, aspect-fixed box
``[cx - sw/2, cx + sw/2]`` maps onto the pixel centres ``0 .. W-1`` of the crop, i.e.
``u = (W-1)/sw * (x - cx + sw/2)``. The official back-projection divides by ``W`` rather than
``W-1`` (``X = u/W * sw + cx - sw/2``); :func:`input_to_image` reproduces that on purpose.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch

#: Box enlargement before cropping (``bbox_padding`` of the official configs).
BOX_PADDING = 1.25
#: Model input of the released pose models, ``(H, W)``.
POSE_INPUT_SIZE = (1024, 768)
#: Per-channel RGB mean / std on the 0-255 scale (the image pre-processor of every config).
PIXEL_MEAN_RGB = (123.675, 116.28, 103.53)
PIXEL_STD_RGB = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class CropGeometry:
    """Where one person crop came from.

    Attributes:
        center: ``(2,)`` float32, box centre ``(cx, cy)`` in image pixels.
        scale: ``(2,)`` float32, ``(sw, sh)`` of the padded, aspect-fixed box in image pixels.
        input_size: ``(H, W)`` of the crop in pixels.
        matrix: ``(2, 3)`` float32 affine mapping image pixels to crop pixels.
    """

    center: np.ndarray
    scale: np.ndarray
    input_size: tuple[int, int]
    matrix: np.ndarray


def bbox_to_center_scale(
    bboxes_xyxy: np.ndarray, *, padding: float = BOX_PADDING
) -> tuple[np.ndarray, np.ndarray]:
    """Box corners -> centre and padded size, float32 arithmetic.

    Args:
        bboxes_xyxy: ``[..., 4]`` boxes ``(x1, y1, x2, y2)`` in image pixels (cast to float32).
        padding: size multiplier.

    Returns:
        ``center [..., 2]`` = ``((x1+x2)/2, (y1+y2)/2)`` and ``scale [..., 2]`` =
        ``(x2-x1, y2-y1) * padding``, both float32.
    """
    b = np.asarray(bboxes_xyxy, dtype=np.float32)
    if b.shape[-1] != 4:
        raise ValueError(
            f"boxes must have 4 values (x1, y1, x2, y2) in the last axis, got {b.shape}"
        )
    center = np.stack([b[..., 0] + b[..., 2], b[..., 1] + b[..., 3]], axis=-1) * np.float32(0.5)
    scale = np.stack([b[..., 2] - b[..., 0], b[..., 3] - b[..., 1]], axis=-1) * np.float32(padding)
    return center, scale


def fix_aspect_ratio(scale: np.ndarray, *, aspect_ratio: float) -> np.ndarray:
    """Grow ``(w, h)`` along one axis so that ``w / h == aspect_ratio`` (float32 arithmetic).

    ``(w, w / aspect)`` if ``w > h * aspect`` else ``(h * aspect, h)``; ``aspect`` is W/H of the
    model input (0.75 for 768x1024). ``scale``: ``[..., 2]``; returns the same shape, float32.
    """
    s = np.asarray(scale, dtype=np.float32)
    # A Python float meets a float32 array as a weak scalar (NEP 50): it is rounded to float32
    # and the arithmetic stays float32, exactly as in the official code.
    w, h = s[..., 0], s[..., 1]
    wide = w > h * aspect_ratio
    out_w = np.where(wide, w, h * aspect_ratio)
    out_h = np.where(wide, w / aspect_ratio, h)
    return np.stack([out_w, out_h], axis=-1).astype(np.float32)


def udp_warp_matrix(
    center: np.ndarray, scale: np.ndarray, *, input_size: tuple[int, int]
) -> np.ndarray:
    """The ``(2, 3)`` float32 UDP affine (no rotation) from image pixels to crop pixels.

    ``sx = (W-1)/sw``, ``sy = (H-1)/sh``; ``m02 = sx * (-cx + sw/2)``, ``m12 = sy * (-cy + sh/2)``,
    each entry evaluated in float32 in the official order (``-0.5 * (2 cx) + 0.5 * sw``).

    Args:
        center: ``(2,)`` box centre, image pixels.
        scale: ``(2,)`` aspect-fixed box size ``(sw, sh)``, image pixels.
        input_size: crop ``(H, W)``.
    """
    c = np.asarray(center, dtype=np.float32)
    s = np.asarray(scale, dtype=np.float32)
    height, width = input_size
    sx = np.float32(width - 1) / s[0]
    sy = np.float32(height - 1) / s[1]
    half = np.float32(0.5)
    doubled = c * np.float32(2.0)
    m = np.zeros((2, 3), dtype=np.float32)
    m[0, 0] = sx
    m[1, 1] = sy
    m[0, 2] = sx * (-half * doubled[0] + half * s[0])
    m[1, 2] = sy * (-half * doubled[1] + half * s[1])
    return m


def warp_interpolation(matrix: np.ndarray) -> int:
    """OpenCV flag of the official crop: ``INTER_AREA`` when shrinking, else ``INTER_CUBIC``.

    Inside ``cv2.warpAffine``, ``INTER_AREA`` runs as bilinear; the flag is kept so the call is
    literally the official one. "Shrinking" means ``min(sx, sy) < 1``.
    """
    shrink = min(float(np.hypot(*matrix[0, :2])), float(np.hypot(*matrix[1, :2])))
    return cv2.INTER_AREA if shrink < 1.0 else cv2.INTER_CUBIC


def crop_geometry(
    bbox_xyxy: np.ndarray,
    *,
    input_size: tuple[int, int] = POSE_INPUT_SIZE,
    padding: float = BOX_PADDING,
) -> CropGeometry:
    """Centre, aspect-fixed size and warp matrix of one ``xyxy`` box for a crop ``(H, W)``."""
    height, width = input_size
    center, scale = bbox_to_center_scale(np.asarray(bbox_xyxy)[:4], padding=padding)
    scale = fix_aspect_ratio(scale, aspect_ratio=width / height)
    matrix = udp_warp_matrix(center, scale, input_size=input_size)
    return CropGeometry(center=center, scale=scale, input_size=(height, width), matrix=matrix)


def crop_person(
    image_bgr: np.ndarray,
    bbox_xyxy: np.ndarray,
    *,
    input_size: tuple[int, int] = POSE_INPUT_SIZE,
    padding: float = BOX_PADDING,
) -> tuple[np.ndarray, CropGeometry]:
    """Cut one person out of an image with the official UDP affine warp.

    Args:
        image_bgr: ``[H_img, W_img, 3]`` uint8 (any channel order; it is not touched).
        bbox_xyxy: ``(4,)`` or ``(5,)`` box in image pixels (a trailing score is ignored).
        input_size: crop ``(H, W)``.
        padding: box enlargement.

    Returns:
        ``crop [H, W, 3]`` uint8 (outside the image: 0) and its :class:`CropGeometry`.
    """
    geometry = crop_geometry(bbox_xyxy, input_size=input_size, padding=padding)
    height, width = input_size
    crop = cv2.warpAffine(
        image_bgr,
        geometry.matrix,
        (width, height),
        flags=warp_interpolation(geometry.matrix),
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )
    return crop, geometry


def crop_people(
    image_bgr: np.ndarray,
    bboxes_xyxy: np.ndarray,
    *,
    input_size: tuple[int, int] = POSE_INPUT_SIZE,
    padding: float = BOX_PADDING,
) -> tuple[np.ndarray, list[CropGeometry]]:
    """:func:`crop_person` for every box: ``bboxes_xyxy [N, 4|5]`` -> uint8 ``[N, H, W, 3]``."""
    boxes = np.asarray(bboxes_xyxy, dtype=np.float32)
    if boxes.ndim != 2 or boxes.shape[1] not in (4, 5):
        raise ValueError(
            f"boxes must be [N, 4] or [N, 5] (x1, y1, x2, y2[, score]), got {boxes.shape}"
        )
    height, width = input_size
    crops = np.zeros((len(boxes), height, width, image_bgr.shape[2]), dtype=np.uint8)
    geometries = []
    for i, box in enumerate(boxes):
        crops[i], geometry = crop_person(image_bgr, box, input_size=input_size, padding=padding)
        geometries.append(geometry)
    return crops, geometries


def normalize_crops(
    crops_bgr: np.ndarray | torch.Tensor, *, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """uint8 BGR crops ``[N, H, W, 3]`` -> float32 RGB model input ``[N, 3, H, W]``, (x-mean)/std.

    Same op order as the official pre-processor: float32, channel flip, subtract, divide.
    """
    x = torch.as_tensor(crops_bgr).to(device)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 crops [N, H, W, 3], got {tuple(x.shape)} {x.dtype}")
    x = x.permute(0, 3, 1, 2).float().flip(1)  # [N, 3, H, W] RGB
    mean = torch.tensor(PIXEL_MEAN_RGB, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD_RGB, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def heatmap_to_input(
    keypoints_hm: np.ndarray, *, heatmap_size: tuple[int, int], input_size: tuple[int, int]
) -> np.ndarray:
    """Heatmap pixels -> crop pixels (UDP): ``x * W / (w-1)``, ``y * H / (h-1)``, float64.

    ``keypoints_hm``: ``[..., 2]`` ``(x, y)``; sizes are ``(h, w)`` and ``(H, W)``.
    """
    h, w = heatmap_size
    height, width = input_size
    kp = np.asarray(keypoints_hm)
    return kp / np.array([w - 1, h - 1], dtype=np.int64) * np.array([width, height], dtype=np.int64)


def input_to_image(
    keypoints_in: np.ndarray, *, center: np.ndarray, scale: np.ndarray, input_size: tuple[int, int]
) -> np.ndarray:
    """Crop pixels -> image pixels, ``X = x / W * sw + cx - sw / 2`` (float64, official order).

    The official code divides by ``W`` and ``H`` here (not ``W-1``/``H-1`` as in the warp);
    this is reproduced for parity.

    Args:
        keypoints_in: ``[..., K, 2]`` ``(x, y)`` crop pixels.
        center, scale: ``[..., 2]`` of the crop (see :class:`CropGeometry`), broadcast over K.
        input_size: crop ``(H, W)``.
    """
    height, width = input_size
    c = np.asarray(center, dtype=np.float32)[..., None, :]
    s = np.asarray(scale, dtype=np.float32)[..., None, :]
    kp = np.asarray(keypoints_in, dtype=np.float64)
    return kp / np.array([width, height], dtype=np.int64) * s + c - 0.5 * s


def heatmap_to_image(
    keypoints_hm: np.ndarray,
    geometries: list[CropGeometry],
    *,
    heatmap_size: tuple[int, int],
) -> np.ndarray:
    """Decoded heatmap locations ``[N, K, 2]`` of N crops -> image pixels ``[N, K, 2]`` float64."""
    kp = np.asarray(keypoints_hm)
    if kp.ndim != 3 or len(geometries) != kp.shape[0]:
        raise ValueError(
            f"need keypoints [N, K, 2] and one geometry per crop, "
            f"got {kp.shape} and {len(geometries)}"
        )
    out = np.empty(kp.shape, dtype=np.float64)
    for i, g in enumerate(geometries):
        kp_in = heatmap_to_input(kp[i], heatmap_size=heatmap_size, input_size=g.input_size)
        out[i] = input_to_image(kp_in, center=g.center, scale=g.scale, input_size=g.input_size)
    return out
