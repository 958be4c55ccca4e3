"""Geometric augmentations applied consistently to an image and its dense targets.

A :class:`DenseSample` holds the 8-bit BGR image and target maps named by kind; the kind
decides how a map is resampled, padded and flipped:

=========  ==============  ==========  =========================================
kind       interpolation   fill        horizontal flip
=========  ==============  ==========  =========================================
label      nearest         255         mirror, then left/right class swap (LUT)
mask       nearest         0 (invalid) mirror
normal     nearest         0           mirror, negate x (channel 0)
albedo     bilinear        0           mirror
depth      nearest         0           mirror
=========  ==============  ==========  =========================================

Intrinsics ``K`` (``[3, 3]``, pixels, pixel centres at integers) follow every geometric op.
Every random op takes an explicit ``numpy.random.Generator`` and draws its probability first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import cv2
import numpy as np

from sapiens2_cli.train.task_config import Flip, RandomCrop, RandomScale, Rotate, SegCrop

__all__ = [
    "DenseSample",
    "horizontal_flip",
    "random_crop",
    "random_rotate",
    "random_scale",
    "resize_exact",
    "resize_pad",
    "seg_random_crop",
    "seg_random_resize",
]

_NEAREST = ("label", "mask", "normal", "depth")
_FILL = {"label": 255, "mask": 0, "normal": 0.0, "albedo": 0.0, "depth": 0.0}


@dataclass
class DenseSample:
    """An image and its targets at the same resolution.

    Attributes:
        image: ``[H, W, 3]`` uint8 BGR.
        maps: kind -> ``[H, W]`` or ``[H, W, C]`` array (mask as uint8 0/1, label uint8).
        intrinsics: ``[3, 3]`` float64 camera matrix in pixels, or None.
        pad: ``(left, right, top, bottom)`` padding added by :func:`resize_pad`.
    """

    image: np.ndarray
    maps: dict[str, np.ndarray] = field(default_factory=dict)
    intrinsics: np.ndarray | None = None
    pad: tuple[int, int, int, int] = (0, 0, 0, 0)

    @property
    def size(self) -> tuple[int, int]:
        """``(H, W)``."""
        return self.image.shape[0], self.image.shape[1]


def _resize_map(kind: str, array: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    interp = cv2.INTER_NEAREST if kind in _NEAREST else cv2.INTER_LINEAR
    out = cv2.resize(array, size_wh, interpolation=interp)
    return out.reshape(size_wh[1], size_wh[0], *array.shape[2:])  # cv2 drops a 1-channel axis


def _scale_intrinsics(k: np.ndarray | None, rx: float, ry: float, dx: float = 0.0, dy: float = 0.0):
    if k is None:
        return None
    k = k.copy()
    k[0, 0] *= rx
    k[0, 2] = k[0, 2] * rx + dx
    k[1, 1] *= ry
    k[1, 2] = k[1, 2] * ry + dy
    return k


def resize(sample: DenseSample, size_wh: tuple[int, int], *, image_interp: int) -> DenseSample:
    """Resize image (``image_interp``) and maps (by kind) to ``(W, H)``; K scaled per axis."""
    h, w = sample.size
    rx, ry = size_wh[0] / w, size_wh[1] / h
    return replace(
        sample,
        image=cv2.resize(sample.image, size_wh, interpolation=image_interp),
        maps={k: _resize_map(k, v, size_wh) for k, v in sample.maps.items()},
        intrinsics=_scale_intrinsics(sample.intrinsics, rx, ry),
    )


def crop(sample: DenseSample, x0: int, y0: int, w: int, h: int) -> DenseSample:
    """Crop ``[y0, y0 + h) x [x0, x0 + w)`` (must lie inside the image); principal point shifted."""
    k = None if sample.intrinsics is None else sample.intrinsics.copy()
    if k is not None:
        k[0, 2] -= x0
        k[1, 2] -= y0
    return replace(
        sample,
        image=sample.image[y0 : y0 + h, x0 : x0 + w].copy(),
        maps={n: m[y0 : y0 + h, x0 : x0 + w].copy() for n, m in sample.maps.items()},
        intrinsics=k,
    )


def pad_to(sample: DenseSample, left: int, right: int, top: int, bottom: int) -> DenseSample:
    """Constant padding: image 0, maps with their kind's fill value."""

    def pad(array: np.ndarray, value: float) -> np.ndarray:
        widths = ((top, bottom), (left, right)) + ((0, 0),) * (array.ndim - 2)
        return np.pad(array, widths, mode="constant", constant_values=value)

    return replace(
        sample,
        image=pad(sample.image, 0),
        maps={n: pad(m, _FILL[n]) for n, m in sample.maps.items()},
        intrinsics=_scale_intrinsics(sample.intrinsics, 1.0, 1.0, left, top),
    )


def random_scale(sample: DenseSample, rng: np.random.Generator, cfg: RandomScale) -> DenseSample:
    """With probability ``p`` resize by ``U(factor)`` (image bilinear)."""
    if rng.random() >= cfg.p:
        return sample
    factor = rng.uniform(*cfg.factor)
    h, w = sample.size
    size = (max(1, int(round(w * factor))), max(1, int(round(h * factor))))
    return resize(sample, size, image_interp=cv2.INTER_LINEAR)


def random_crop(sample: DenseSample, rng: np.random.Generator, cfg: RandomCrop) -> DenseSample:
    """With probability ``p`` crop a window of area ``U(area)`` x image area and aspect W/H
    ``U(aspect)``; up to ``tries`` draws, the first that fits is used (none fits: no crop)."""
    if rng.random() >= cfg.p:
        return sample
    h, w = sample.size
    for _ in range(cfg.tries):
        area = rng.uniform(*cfg.area) * h * w
        aspect = rng.uniform(*cfg.aspect)
        cw, ch = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            x0 = int(rng.integers(0, w - cw + 1))
            y0 = int(rng.integers(0, h - ch + 1))
            return crop(sample, x0, y0, cw, ch)
    return sample


def horizontal_flip(
    sample: DenseSample, rng: np.random.Generator, cfg: Flip, *, label_lut: np.ndarray | None = None
) -> DenseSample:
    """With probability ``p`` mirror left-right (see the kind table); ``c_x -> W - 1 - c_x``."""
    if rng.random() >= cfg.p:
        return sample
    maps = {}
    for kind, array in sample.maps.items():
        flipped = array[:, ::-1].copy()
        if kind == "normal":
            flipped[..., 0] *= -1
        elif kind == "label" and label_lut is not None:
            flipped = label_lut[flipped]
        maps[kind] = flipped
    k = None if sample.intrinsics is None else sample.intrinsics.copy()
    if k is not None:
        k[0, 2] = sample.size[1] - 1 - k[0, 2]
    return replace(sample, image=sample.image[:, ::-1].copy(), maps=maps, intrinsics=k)


def resize_pad(sample: DenseSample, size: tuple[int, int]) -> DenseSample:
    """Fit inside ``size`` = ``(H, W)`` keeping the aspect, then pad centred with zeros.

    ``s = min(W_t / W, H_t / H)``, new size ``(int(W s), int(H s))`` (truncated), image
    bilinear; padding ``left = pad_w // 2``, ``top = pad_h // 2`` (remainder right / bottom);
    padded mask pixels are invalid. Records ``pad``.
    """
    (th, tw), (h, w) = size, sample.size
    scale = min(tw / w, th / h)
    nw, nh = max(1, int(w * scale)), max(1, int(h * scale))
    out = resize(sample, (nw, nh), image_interp=cv2.INTER_LINEAR)
    left, top = (tw - nw) // 2, (th - nh) // 2
    right, bottom = tw - nw - left, th - nh - top
    out = pad_to(out, left, right, top, bottom)
    return replace(out, pad=(left, right, top, bottom))


def resize_exact(sample: DenseSample, size: tuple[int, int]) -> DenseSample:
    """Resize to exactly ``(H, W)`` ignoring the aspect: image INTER_AREA when the width
    shrinks, else INTER_CUBIC (the seg input transform); maps by kind."""
    th, tw = size
    interp = cv2.INTER_AREA if tw < sample.size[1] else cv2.INTER_CUBIC
    return resize(sample, (tw, th), image_interp=interp)


# --------------------------------------------------------------------------- segmentation
def seg_random_resize(
    sample: DenseSample, rng: np.random.Generator, ratio: tuple[float, float], size: tuple[int, int]
) -> DenseSample:
    """Fit (aspect kept) inside ``(H u, W u)``, ``u ~ U(ratio)``; INTER_AREA when shrinking,
    INTER_CUBIC when enlarging; labels nearest."""
    u = rng.uniform(*ratio)
    (th, tw), (h, w) = size, sample.size
    scale = min(th * u / h, tw * u / w)
    new = (max(1, int(w * scale + 0.5)), max(1, int(h * scale + 0.5)))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    return resize(sample, new, image_interp=interp)


def seg_random_crop(
    sample: DenseSample,
    rng: np.random.Generator,
    cfg: SegCrop,
    size: tuple[int, int],
    *,
    ignore_index: int = 255,
) -> DenseSample:
    """With probability ``p`` crop ``size`` (padding bottom / right first if smaller: image 0,
    label 255); up to ``tries`` draws for one with at least two labels where the most frequent
    non-ignored label covers less than ``max_class_ratio`` (else the last draw is kept)."""
    if rng.random() >= cfg.p:
        return sample
    th, tw = size
    h, w = sample.size
    if h < th or w < tw:
        sample = pad_to(sample, 0, max(tw - w, 0), 0, max(th - h, 0))
        h, w = sample.size
    for _ in range(cfg.tries):
        y0 = int(rng.integers(0, h - th + 1))
        x0 = int(rng.integers(0, w - tw + 1))
        label = sample.maps["label"][y0 : y0 + th, x0 : x0 + tw]
        counts = np.bincount(label.ravel(), minlength=256)
        counts[ignore_index] = 0
        counts = counts[counts > 0]
        if len(counts) > 1 and counts.max() / counts.sum() < cfg.max_class_ratio:
            break
    return crop(sample, x0, y0, tw, th)


def random_rotate(sample: DenseSample, rng: np.random.Generator, cfg: Rotate) -> DenseSample:
    """With probability ``p`` rotate by ``U(-max, max)`` degrees about the image centre; image
    bilinear with 0 fill, labels nearest with **0 (background)** fill, other maps their fill."""
    if rng.random() >= cfg.p:
        return sample
    angle = rng.uniform(-cfg.max_degrees, cfg.max_degrees)
    h, w = sample.size
    matrix = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), angle, 1.0)

    def warp(array: np.ndarray, interp: int, fill: float) -> np.ndarray:
        out = cv2.warpAffine(
            array, matrix, (w, h), flags=interp, borderMode=cv2.BORDER_CONSTANT, borderValue=fill
        )
        return out.reshape(array.shape)

    maps = {}
    for kind, array in sample.maps.items():
        fill = 0 if kind == "label" else _FILL[kind]
        maps[kind] = warp(array, cv2.INTER_NEAREST if kind in _NEAREST else cv2.INTER_LINEAR, fill)
    if sample.intrinsics is not None:
        raise ValueError("random_rotate does not transform camera intrinsics")
    return replace(sample, image=warp(sample.image, cv2.INTER_LINEAR, 0), maps=maps)
