"""Multi-crop views for pretraining: 2 global crops (masked) and N local crops, explicit RNG.

Every view: random resized crop (area fraction in ``scale``, aspect log-uniform in
``[3/4, 4/3]`` times the output aspect; centre crop after 10 failed draws), resize (area
interpolation when shrinking, bilinear when enlarging), horizontal flip. Local views only:
colour jitter (brightness, contrast, saturation, hue, in that order), grayscale, Gaussian
blur, solarisation -- global views stay colour-clean because they are reconstruction targets.
Then BGR -> RGB and ImageNet normalisation on the 0-255 scale. Images are uint8 BGR HWC
(OpenCV convention) in, ``float32 [3, H, W]`` out. All randomness comes from the
``numpy.random.Generator`` passed in.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch

from sapiens2_cli.pretrain.config import PretrainAugment
from sapiens2_cli.pretrain.masking import sample_masks

MEAN_BGR = np.array([103.53, 116.28, 123.675], dtype=np.float32)
STD_BGR = np.array([57.375, 57.12, 58.395], dtype=np.float32)
CROP_ATTEMPTS = 10


def random_resized_crop(
    image: np.ndarray, size: tuple[int, int], scale: tuple[float, float], rng: np.random.Generator
) -> np.ndarray:
    """A crop covering ``scale`` of the image area, resized to ``size`` = ``(H, W)``."""
    ih, iw = image.shape[:2]
    out_h, out_w = size
    base = out_w / out_h
    area = ih * iw
    for _ in range(CROP_ATTEMPTS):
        target = area * rng.uniform(*scale)
        aspect = base * math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw = round(math.sqrt(target * aspect))
        ch = round(math.sqrt(target / aspect))
        if 0 < cw <= iw and 0 < ch <= ih:
            top = int(rng.integers(0, ih - ch + 1))
            left = int(rng.integers(0, iw - cw + 1))
            break
    else:  # centre crop at the output aspect
        cw, ch = (iw, max(1, round(iw / base))) if iw / ih < base else (max(1, round(ih * base)), ih)
        cw, ch = min(cw, iw), min(ch, ih)
        top, left = (ih - ch) // 2, (iw - cw) // 2
    crop = image[top : top + ch, left : left + cw]
    interp = cv2.INTER_AREA if ch * cw > out_h * out_w else cv2.INTER_LINEAR
    return cv2.resize(crop, (out_w, out_h), interpolation=interp)


def color_jitter(image: np.ndarray, cfg: PretrainAugment, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast, saturation factors in ``[1 - s, 1 + s]``; hue shift ``+-hue`` turns."""
    x = image.astype(np.float32)
    x *= rng.uniform(1 - cfg.brightness, 1 + cfg.brightness)
    gray_mean = cv2.cvtColor(np.clip(x, 0, 255).astype(np.uint8), cv2.COLOR_BGR2GRAY).mean()
    x = (x - gray_mean) * rng.uniform(1 - cfg.contrast, 1 + cfg.contrast) + gray_mean
    x = np.clip(x, 0, 255)
    gray = cv2.cvtColor(x.astype(np.uint8), cv2.COLOR_BGR2GRAY).astype(np.float32)[..., None]
    x = np.clip((x - gray) * rng.uniform(1 - cfg.saturation, 1 + cfg.saturation) + gray, 0, 255)
    hsv = cv2.cvtColor(x.astype(np.uint8), cv2.COLOR_BGR2HSV)
    shift = round(rng.uniform(-cfg.hue, cfg.hue) * 180)  # OpenCV hue unit: 2 degrees
    hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + shift) % 180).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)


def local_photometric(image: np.ndarray, cfg: PretrainAugment, rng: np.random.Generator) -> np.ndarray:
    """Colour jitter, grayscale, blur and solarisation, each with its probability."""
    if rng.random() < cfg.jitter_prob:
        image = color_jitter(image, cfg, rng)
    if rng.random() < cfg.grayscale_prob:
        image = cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
    if rng.random() < cfg.blur_prob:
        image = cv2.GaussianBlur(image, (0, 0), sigmaX=rng.uniform(*cfg.blur_sigma))
    if rng.random() < cfg.solarize_prob:
        image = np.where(image >= 128, 255 - image, image).astype(np.uint8)
    return image


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 BGR ``[H, W, 3]`` -> ImageNet-normalised RGB ``float32 [3, H, W]``."""
    x = (image.astype(np.float32) - MEAN_BGR) / STD_BGR
    return torch.from_numpy(np.ascontiguousarray(x[..., ::-1].transpose(2, 0, 1)))


class MultiCrop:
    """Image -> ``global_crops [G, 3, H, W]``, ``local_crops [L, 3, h, w]``, masks of the globals.

    ``global_size`` is ``(H, W)`` pixels (the run's ``model.input_size``); ``grid`` the
    encoder's cell grid of a global crop (``H/stride, W/stride``); ``keep`` ``[G, K]`` and
    ``masked`` ``[G, M]`` index it (``masking.sample_masks``).
    """

    def __init__(
        self,
        augment: PretrainAugment,
        *,
        global_size: tuple[int, int],
        grid: tuple[int, int],
        num_global: int = 2,
    ) -> None:
        self.crops, self.masking = augment, augment.masking
        self.global_size, self.grid, self.num_global = tuple(global_size), grid, num_global

    def view(self, image: np.ndarray, rng: np.random.Generator, *, local: bool) -> torch.Tensor:
        c = self.crops
        size, scale = (c.local_size, c.local_scale) if local else (self.global_size, c.global_scale)
        crop = random_resized_crop(image, size, scale, rng)
        if rng.random() < c.flip_prob:
            crop = crop[:, ::-1]
        if local:
            crop = local_photometric(np.ascontiguousarray(crop), c, rng)
        return to_tensor(crop)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        glob = torch.stack([self.view(image, rng, local=False) for _ in range(self.num_global)])
        h, w = self.crops.local_size
        local = [self.view(image, rng, local=True) for _ in range(self.crops.num_local)]
        local_t = torch.stack(local) if local else torch.zeros(0, 3, h, w)
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        m = self.masking
        masks = sample_masks(
            self.num_global,
            *self.grid,
            ratio=m.ratio,
            block_prob=m.block_prob,
            generator=gen,
            min_block=m.min_block_patches,
            aspect=m.block_aspect,
        )
        return {"global_crops": glob, "local_crops": local_t, "keep": masks.keep, "masked": masks.masked}
