"""Image-only augmentations on 8-bit BGR ``[H, W, 3]`` arrays (training spec §2).

Each op takes the image, an explicit ``numpy.random.Generator`` and its config section, draws
its own probability ``cfg.p`` first, and returns a new uint8 array (the input is not modified).
All randomness comes from ``rng``, so a sample is reproducible from its generator state.
"""

from __future__ import annotations

import cv2
import numpy as np

from sapiens2_cli.train.task_config import (
    CoarseDropout,
    DownUp,
    GaussianBlur,
    GaussianNoise,
    KernelBlur,
    Photometric,
    Solarize,
)

__all__ = [
    "box_blur",
    "coarse_dropout",
    "down_up",
    "gaussian_blur",
    "gaussian_noise",
    "median_blur",
    "photometric_distortion",
    "solarize",
]

_INTERPOLATIONS = (
    cv2.INTER_NEAREST,
    cv2.INTER_LINEAR,
    cv2.INTER_CUBIC,
    cv2.INTER_AREA,
    cv2.INTER_LANCZOS4,
)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def photometric_distortion(
    image: np.ndarray, rng: np.random.Generator, cfg: Photometric
) -> np.ndarray:
    """Brightness, contrast (before or after the colour ops), saturation and hue jitter.

    With probability ``cfg.p`` the op runs; inside, each of the four sub-ops runs with
    probability 0.5: brightness ``+ U(-b, b)``; contrast ``* U(c0, c1)``; saturation (HSV S
    channel) ``* U(s0, s1)``; hue ``+ U(-h, h)`` OpenCV units modulo 180. The image is rounded
    and clipped to [0, 255] after every sub-op.
    """
    if rng.random() >= cfg.p:
        return image
    out = image.copy()
    if rng.random() < 0.5:
        out = _to_uint8(out.astype(np.float32) + rng.uniform(-cfg.brightness, cfg.brightness))
    contrast_first = rng.random() < 0.5

    def contrast(img: np.ndarray) -> np.ndarray:
        if rng.random() < 0.5:
            return _to_uint8(img.astype(np.float32) * rng.uniform(*cfg.contrast))
        return img

    if contrast_first:
        out = contrast(out)
    if rng.random() < 0.5:
        hsv = cv2.cvtColor(out, cv2.COLOR_BGR2HSV)
        hsv[..., 1] = _to_uint8(hsv[..., 1].astype(np.float32) * rng.uniform(*cfg.saturation))
        out = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    if rng.random() < 0.5:
        hsv = cv2.cvtColor(out, cv2.COLOR_BGR2HSV)
        delta = int(round(rng.uniform(-cfg.hue, cfg.hue)))
        hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + delta) % 180).astype(np.uint8)
        out = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    if not contrast_first:
        out = contrast(out)
    return out


def gaussian_blur(image: np.ndarray, rng: np.random.Generator, cfg: GaussianBlur) -> np.ndarray:
    """``kernel x kernel`` Gaussian blur with sigma ``~ U(sigma)``."""
    if rng.random() >= cfg.p:
        return image
    sigma = rng.uniform(*cfg.sigma)
    return cv2.GaussianBlur(image, (cfg.kernel, cfg.kernel), sigmaX=sigma, sigmaY=sigma)


def gaussian_noise(image: np.ndarray, rng: np.random.Generator, cfg: GaussianNoise) -> np.ndarray:
    """Additive zero-mean Gaussian noise with variance ``~ U(variance)`` (0-255 scale)."""
    if rng.random() >= cfg.p:
        return image
    std = np.sqrt(rng.uniform(*cfg.variance))
    return _to_uint8(
        image.astype(np.float32) + rng.normal(0.0, std, image.shape).astype(np.float32)
    )


def solarize(image: np.ndarray, rng: np.random.Generator, cfg: Solarize) -> np.ndarray:
    """Invert pixels at or above ``threshold``: ``v -> 255 - v``."""
    if rng.random() >= cfg.p:
        return image
    return np.where(image >= cfg.threshold, 255 - image, image).astype(np.uint8)


def down_up(image: np.ndarray, rng: np.random.Generator, cfg: DownUp) -> np.ndarray:
    """Resize down by ``U(factor)`` and back, each way with a random OpenCV interpolation."""
    if rng.random() >= cfg.p:
        return image
    h, w = image.shape[:2]
    factor = rng.uniform(*cfg.factor)
    small = (max(1, int(w * factor)), max(1, int(h * factor)))
    down = _INTERPOLATIONS[rng.integers(len(_INTERPOLATIONS))]
    up = _INTERPOLATIONS[rng.integers(len(_INTERPOLATIONS))]
    return cv2.resize(cv2.resize(image, small, interpolation=down), (w, h), interpolation=up)


def _odd_kernel(rng: np.random.Generator, bounds: tuple[int, int]) -> int:
    choices = [k for k in range(bounds[0], bounds[1] + 1) if k % 2 == 1]
    if not choices:
        raise ValueError(f"kernel range {bounds} holds no odd size")
    return int(choices[rng.integers(len(choices))])


def box_blur(image: np.ndarray, rng: np.random.Generator, cfg: KernelBlur) -> np.ndarray:
    """Mean filter with a random odd square kernel."""
    if rng.random() >= cfg.p:
        return image
    k = _odd_kernel(rng, cfg.kernel)
    return cv2.blur(image, (k, k))


def median_blur(image: np.ndarray, rng: np.random.Generator, cfg: KernelBlur) -> np.ndarray:
    """Median filter with a random odd square kernel."""
    if rng.random() >= cfg.p:
        return image
    return cv2.medianBlur(image, _odd_kernel(rng, cfg.kernel))


def coarse_dropout(image: np.ndarray, rng: np.random.Generator, cfg: CoarseDropout) -> np.ndarray:
    """Zero ``holes`` rectangles; each side is ``U(size)`` times the image side."""
    if rng.random() >= cfg.p:
        return image
    out = image.copy()
    h, w = image.shape[:2]
    for _ in range(cfg.holes):
        hole_h = max(1, int(h * rng.uniform(*cfg.size)))
        hole_w = max(1, int(w * rng.uniform(*cfg.size)))
        y0 = int(rng.integers(0, h - hole_h + 1))
        x0 = int(rng.integers(0, w - hole_w + 1))
        out[y0 : y0 + hole_h, x0 : x0 + hole_w] = 0
    return out
