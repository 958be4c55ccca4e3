"""Training and validation pipelines of the dense tasks, in the released order (spec §2.2-2.5).

Each ``*_train`` function takes a :class:`DenseSample` at source resolution, an explicit
``numpy.random.Generator``, the task's augmentation section and the network input size
``(H, W)``; it returns the augmented sample at input size, or ``None`` when the released
recipe rejects the sample (the dataset then draws another one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np

from sapiens2_cli.train import photometric as photo
from sapiens2_cli.train.augment import (
    DenseSample,
    horizontal_flip,
    random_crop,
    random_rotate,
    random_scale,
    resize_exact,
    resize_pad,
    seg_random_crop,
    seg_random_resize,
)
from sapiens2_cli.train.task_config import (
    AlbedoAugment,
    NormalAugment,
    PointmapAugment,
    RandomBackground,
    SegAugment,
)

__all__ = [
    "albedo_train",
    "dense_val",
    "normal_train",
    "pointmap_target",
    "pointmap_train",
    "pointmap_val",
    "random_background",
    "seg_train",
    "seg_val",
]


def _valid_fraction_ok(mask: np.ndarray, min_pixels: int, max_fraction: float) -> bool:
    count = int(mask.sum())
    return count >= min_pixels and count <= max_fraction * mask.size


# --------------------------------------------------------------------------- segmentation
def random_background(
    sample: DenseSample,
    rng: np.random.Generator,
    cfg: RandomBackground,
    backgrounds: Sequence[Path],
) -> DenseSample:
    """With probability ``p`` replace label-0 pixels by a random background image.

    The background is resized to the image height (aspect kept) and centre-cropped to the
    width, or stretched when too narrow; the person is recoloured with Reinhard's transfer in
    Lab space (foreground mean / std matched to the background's) before compositing.
    """
    if not backgrounds or rng.random() >= cfg.p:
        return sample
    path = backgrounds[int(rng.integers(len(backgrounds)))]
    bg = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bg is None:
        raise ValueError(f"{path}: background image cannot be decoded")
    h, w = sample.size
    new_w = max(1, int(round(bg.shape[1] * h / bg.shape[0])))
    bg = cv2.resize(bg, (new_w, h), interpolation=cv2.INTER_LINEAR)
    if new_w >= w:
        x0 = (new_w - w) // 2
        bg = bg[:, x0 : x0 + w]
    else:
        bg = cv2.resize(bg, (w, h), interpolation=cv2.INTER_LINEAR)
    label = sample.maps["label"]
    person = label != 0
    if not person.any():
        return sample
    lab = cv2.cvtColor(sample.image.astype(np.float32) / 255.0, cv2.COLOR_BGR2LAB)
    bg_lab = cv2.cvtColor(bg.astype(np.float32) / 255.0, cv2.COLOR_BGR2LAB).reshape(-1, 3)
    fg = lab[person]
    fg = (fg - fg.mean(0)) / (fg.std(0) + 1e-6) * bg_lab.std(0) + bg_lab.mean(0)
    lab[person] = fg
    recoloured = cv2.cvtColor(lab, cv2.COLOR_LAB2BGR)
    recoloured = np.clip(np.rint(recoloured * 255.0), 0, 255).astype(np.uint8)
    image = np.where(person[..., None], recoloured, bg)
    return replace(sample, image=image)


def seg_train(
    sample: DenseSample,
    rng: np.random.Generator,
    cfg: SegAugment,
    size: tuple[int, int],
    *,
    flip_lut: np.ndarray,
    backgrounds: Sequence[Path] = (),
    ignore_index: int = 255,
) -> DenseSample | None:
    """background -> random resize -> crop -> blur -> noise -> rotate -> flip (class swap) ->
    photometric -> exact resize; rejected when foreground (label not 0 / ignore) < min fraction."""
    sample = random_background(sample, rng, cfg.background, backgrounds)
    sample = seg_random_resize(sample, rng, cfg.resize_ratio, size)
    sample = seg_random_crop(sample, rng, cfg.crop, size, ignore_index=ignore_index)
    sample = replace(sample, image=photo.gaussian_blur(sample.image, rng, cfg.blur))
    sample = replace(sample, image=photo.gaussian_noise(sample.image, rng, cfg.noise))
    sample = random_rotate(sample, rng, cfg.rotate)
    sample = horizontal_flip(sample, rng, cfg.flip, label_lut=flip_lut)
    sample = replace(sample, image=photo.photometric_distortion(sample.image, rng, cfg.photometric))
    sample = resize_exact(sample, size)
    label = sample.maps["label"]
    foreground = (label != 0) & (label != ignore_index)
    if foreground.sum() < cfg.min_foreground_fraction * label.size:
        return None
    return sample


def seg_val(sample: DenseSample, size: tuple[int, int]) -> DenseSample:
    """Image resized to exactly ``size``; the label stays at source resolution."""
    image = resize_exact(DenseSample(image=sample.image), size).image
    return replace(sample, image=image)


# --------------------------------------------------------------------------- normals
def normal_train(
    sample: DenseSample, rng: np.random.Generator, cfg: NormalAugment, size: tuple[int, int]
) -> DenseSample | None:
    """photometric -> down-up -> scale -> crop -> flip (negate x) -> resize+pad -> blur ->
    noise -> solarize; rejected with too few or too many valid pixels."""
    sample = replace(sample, image=photo.photometric_distortion(sample.image, rng, cfg.photometric))
    sample = replace(sample, image=photo.down_up(sample.image, rng, cfg.down_up))
    sample = random_scale(sample, rng, cfg.scale)
    sample = random_crop(sample, rng, cfg.crop)
    sample = horizontal_flip(sample, rng, cfg.flip)
    sample = resize_pad(sample, size)
    sample = replace(sample, image=photo.gaussian_blur(sample.image, rng, cfg.blur))
    sample = replace(sample, image=photo.gaussian_noise(sample.image, rng, cfg.noise))
    sample = replace(sample, image=photo.solarize(sample.image, rng, cfg.solarize))
    if not _valid_fraction_ok(
        sample.maps["mask"] > 0, cfg.min_valid_pixels, cfg.max_valid_fraction
    ):
        return None
    return sample


def dense_val(sample: DenseSample, size: tuple[int, int]) -> DenseSample:
    """Image resized + padded into ``size`` (``pad`` recorded); targets stay at source size
    (normal, albedo: the metrics compare at the ground truth's resolution)."""
    fitted = resize_pad(DenseSample(image=sample.image), size)
    return replace(sample, image=fitted.image, pad=fitted.pad)


# --------------------------------------------------------------------------- pointmap
def pointmap_target(
    depth: np.ndarray, mask: np.ndarray, intrinsics: np.ndarray, *, canonical_focal: float
) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Canonical pointmap from metric depth and the intrinsics at network resolution.

    ``X = (u - c_x) Z / f_x``, ``Y = (v - c_y) Z / f_y`` (u, v = column, row), then
    ``(X, Y, Z) * s`` with ``s = f_c / f_x``: what a camera of focal ``f_c`` would see.

    Returns:
        ``(points [H, W, 3] float32 (0 where invalid), valid [H, W] bool, s, mean canonical Z)``.
    """
    depth = depth.astype(np.float64)
    valid = (mask > 0) & np.isfinite(depth) & (depth > 0)
    z = np.where(valid, depth, 0.0)
    h, w = z.shape
    fx, fy, cx, cy = intrinsics[0, 0], intrinsics[1, 1], intrinsics[0, 2], intrinsics[1, 2]
    u = np.arange(w, dtype=np.float64)[None, :]
    v = np.arange(h, dtype=np.float64)[:, None]
    scale = canonical_focal / fx
    points = np.stack([(u - cx) * z / fx, (v - cy) * z / fy, z], axis=-1) * scale
    mean_depth = float(points[..., 2][valid].mean()) if valid.any() else 0.0
    return points.astype(np.float32), valid, float(scale), mean_depth


def pointmap_train(
    sample: DenseSample, rng: np.random.Generator, cfg: PointmapAugment, size: tuple[int, int]
) -> DenseSample | None:
    """photometric -> scale -> crop -> flip -> resize+pad (K follows every step); rejected
    with too few / too many valid pixels or a canonical depth below ``min_depth``."""
    sample = replace(sample, image=photo.photometric_distortion(sample.image, rng, cfg.photometric))
    sample = random_scale(sample, rng, cfg.scale)
    sample = random_crop(sample, rng, cfg.crop)
    sample = horizontal_flip(sample, rng, cfg.flip)
    sample = resize_pad(sample, size)
    return _pointmap_filter(sample, cfg)


def pointmap_val(sample: DenseSample, size: tuple[int, int]) -> DenseSample:
    """Everything resized + padded into ``size``: the pointmap is evaluated at network
    resolution in canonical space."""
    return resize_pad(sample, size)


def _pointmap_filter(sample: DenseSample, cfg: PointmapAugment) -> DenseSample | None:
    points, valid, _, _ = pointmap_target(
        sample.maps["depth"],
        sample.maps["mask"],
        sample.intrinsics,
        canonical_focal=cfg.canonical_focal,
    )
    if not _valid_fraction_ok(valid, cfg.min_valid_pixels, cfg.max_valid_fraction):
        return None
    if points[..., 2][valid].min() < cfg.min_depth:
        return None
    return sample


# --------------------------------------------------------------------------- albedo
def albedo_train(
    sample: DenseSample, rng: np.random.Generator, cfg: AlbedoAugment, size: tuple[int, int]
) -> DenseSample | None:
    """scale -> crop -> flip -> resize+pad (albedo bilinear) -> noise; no colour jitter."""
    sample = random_scale(sample, rng, cfg.scale)
    sample = random_crop(sample, rng, cfg.crop)
    sample = horizontal_flip(sample, rng, cfg.flip)
    sample = resize_pad(sample, size)
    sample = replace(sample, image=photo.gaussian_noise(sample.image, rng, cfg.noise))
    if not _valid_fraction_ok(
        sample.maps["mask"] > 0, cfg.min_valid_pixels, cfg.max_valid_fraction
    ):
        return None
    return sample
