"""Invertible image <-> model-input geometry, exactly as the official demo scripts do it.

Forward steps run on the BGR uint8 image with OpenCV (its fixed-point resampling is part of
the result); normalisation runs on the model's device; the inverse steps run on the model's
output tensors with ``F.interpolate`` (bilinear, ``align_corners=False``, no antialias).

* seg (:func:`stretch`): resize to the input size, aspect not kept; ``INTER_AREA`` when the
  target width is smaller than the image width, else ``INTER_CUBIC`` (decided on width only).
* normal / albedo / pointmap (:func:`resize_pad`): ``s = min(W_in/W, H_in/H)``, size
  ``(int(W*s), int(H*s))`` (truncation), ``INTER_LINEAR``, then zero padding of the uint8 image
  (left = padW // 2, top = padH // 2, the remainder right / bottom), so padded pixels become
  ``-mean/std`` after normalisation.

All sizes are ``(H, W)`` in pixels.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import torch
import torch.nn.functional as F

MEAN_RGB = (123.675, 116.28, 103.53)  # 0-255 scale
STD_RGB = (58.395, 57.12, 57.375)
BLUR_SIGMA = 0.8
BLUR_PASSES = 4


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where an image sits inside a model input.

    The image ``image_hw`` was resized to ``content_hw`` and placed at ``(top, left)`` of a
    model input of ``input_hw``; everything outside the content box is padding. A stretch has
    ``content_hw == input_hw`` and offset ``(0, 0)``.
    """

    image_hw: tuple[int, int]
    input_hw: tuple[int, int]
    content_hw: tuple[int, int]
    top: int = 0
    left: int = 0

    @property
    def scale(self) -> float:
        """The resize factor ``s`` of :func:`resize_pad` (content pixels per image pixel)."""
        return min(self.input_hw[1] / self.image_hw[1], self.input_hw[0] / self.image_hw[0])

    @property
    def padding(self) -> tuple[int, int, int, int]:
        """``(left, right, top, bottom)`` padding in model-input pixels."""
        (h_in, w_in), (h, w) = self.input_hw, self.content_hw
        return self.left, w_in - w - self.left, self.top, h_in - h - self.top


def stretch(image: np.ndarray, input_hw: tuple[int, int]) -> tuple[np.ndarray, Placement]:
    """Resize ``image`` ``[H, W, 3]`` uint8 BGR to ``input_hw`` without keeping the aspect ratio."""
    h, w = image.shape[:2]
    h_in, w_in = input_hw
    interpolation = cv2.INTER_AREA if w_in < w else cv2.INTER_CUBIC
    out = cv2.resize(image, (w_in, h_in), interpolation=interpolation)
    return out, Placement((h, w), (h_in, w_in), (h_in, w_in))


def resize_pad(image: np.ndarray, input_hw: tuple[int, int]) -> tuple[np.ndarray, Placement]:
    """Resize ``image`` ``[H, W, 3]`` uint8 BGR into ``input_hw`` keeping its aspect, zero-pad the rest.

    Raises:
        ValueError: the image is so elongated that one resized side would be 0 pixels.
    """
    h, w = image.shape[:2]
    h_in, w_in = input_hw
    s = min(w_in / w, h_in / h)  # Python float64, as the official transform
    new_w, new_h = int(w * s), int(h * s)  # truncation, not rounding
    if new_w < 1 or new_h < 1:
        raise ValueError(f"image of {w}x{h} pixels is too elongated for a {w_in}x{h_in} model input")
    resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    pad_w, pad_h = w_in - new_w, h_in - new_h
    left, top = pad_w // 2, pad_h // 2
    out = cv2.copyMakeBorder(
        resized, top, pad_h - top, left, pad_w - left, cv2.BORDER_CONSTANT, value=(0, 0, 0)
    )
    return out, Placement((h, w), (h_in, w_in), (new_h, new_w), top, left)


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 BGR ``[B, H, W, 3]`` -> float32 RGB ``[B, 3, H, W]``, ``(x - mean) / std`` (0-255 scale)."""
    x = pixels.permute(0, 3, 1, 2).flip(1).float()  # [B, 3, H, W], RGB
    mean = torch.tensor(MEAN_RGB, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD_RGB, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def crop_content(t: torch.Tensor, placement: Placement) -> torch.Tensor:
    """The content box of a model-resolution map ``[..., H_in, W_in]`` -> ``[..., h, w]``.

    A map coarser than the input by a whole factor (the heads on the 4K backbone output a
    quarter of the input) is first resized bilinearly to the input, so that the box is exact.
    """
    map_hw, (h_in, w_in) = tuple(t.shape[-2:]), placement.input_hw
    if map_hw != placement.input_hw:
        if h_in % map_hw[0] or w_in % map_hw[1] or h_in // map_hw[0] != w_in // map_hw[1]:
            raise ValueError(f"map of {map_hw} does not match the model input {placement.input_hw}")
        lead = t.shape[:-2]
        t = resize_bilinear(t.reshape(1, -1, *map_hw), placement.input_hw).reshape(*lead, h_in, w_in)
    h, w = placement.content_hw
    return t[..., placement.top : placement.top + h, placement.left : placement.left + w]


def resize_bilinear(t: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """``[B, C, h, w]`` -> ``[B, C, H, W]``, bilinear, ``align_corners=False``, no antialias."""
    if tuple(t.shape[-2:]) == tuple(size_hw):
        # F.interpolate is the identity at equal sizes; skip the copy.
        return t
    return F.interpolate(t, size=tuple(size_hw), mode="bilinear", align_corners=False, antialias=False)


def gaussian_kernel3(sigma: float, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The 3x3 Gaussian ``[3, 3]``: 1-D weights ``exp(-x^2 / (2 sigma^2))`` at x = -1, 0, 1, normalised,
    outer product (the tensor gaussian blur of the official pointmap demo)."""
    x = torch.linspace(-1.0, 1.0, steps=3, dtype=dtype, device=device)
    pdf = torch.exp(-0.5 * (x / sigma).pow(2))
    k1 = pdf / pdf.sum()
    return torch.mm(k1[:, None], k1[None, :])


def gaussian_blur3(t: torch.Tensor, *, sigma: float = BLUR_SIGMA, passes: int = 1) -> torch.Tensor:
    """``passes`` 3x3 Gaussian blurs of ``[B, C, H, W]``, per channel, reflect border."""
    channels = t.shape[1]
    kernel = gaussian_kernel3(sigma, dtype=t.dtype, device=t.device)
    kernel = kernel.expand(channels, 1, 3, 3)  # [C, 1, 3, 3], one filter per channel
    # Reflection needs two pixels per side; a 1-pixel-wide map can only be replicated.
    mode = "reflect" if min(t.shape[-2:]) > 1 else "replicate"
    for _ in range(passes):
        t = F.conv2d(F.pad(t, [1, 1, 1, 1], mode=mode), kernel, groups=channels)
    return t


def smooth_resize(t: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """The pointmap resize: 4 Gaussian blurs first when either side grows, then bilinear."""
    if size_hw[0] > t.shape[-2] or size_hw[1] > t.shape[-1]:
        t = gaussian_blur3(t, passes=BLUR_PASSES)
    return resize_bilinear(t, size_hw)
