"""Geometry of the pre-processing and its inverse, and the seg argmax in class chunks."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sapiens2_cli import transforms
from sapiens2_cli.tasks.seg import logits_to_labels


def test_resize_pad_truncates_and_splits_padding_like_the_demo():
    image = np.full((256, 224, 3), 200, np.uint8)
    out, p = transforms.resize_pad(image, (128, 96))
    # s = min(96/224, 128/256) = 0.428..., (int(224 s), int(256 s)) = (96, 109): 19 rows of padding
    assert p.content_hw == (109, 96) and p.padding == (0, 0, 9, 10)
    assert out.shape == (128, 96, 3)
    assert (out[:9] == 0).all() and (out[-10:] == 0).all() and (out[9:-10] == 200).all()


def test_resize_pad_odd_horizontal_padding_goes_right():
    _, p = transforms.resize_pad(np.zeros((100, 50, 3), np.uint8), (64, 48))
    # s = min(48/50, 64/100) = 0.64 -> 32 x 64: 16 columns of padding, 8 left, 8 right
    assert p.content_hw == (64, 32) and p.padding == (8, 8, 0, 0)
    _, p = transforms.resize_pad(np.zeros((100, 49, 3), np.uint8), (64, 48))
    assert p.content_hw == (64, 31) and p.padding == (8, 9, 0, 0)


@pytest.mark.parametrize(("width", "flag"), [(200, cv2.INTER_AREA), (96, cv2.INTER_CUBIC), (50, cv2.INTER_CUBIC)])
def test_stretch_chooses_the_interpolation_on_width_only(width, flag):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (40, width, 3), dtype=np.uint8)
    out, p = transforms.stretch(image, (128, 96))
    np.testing.assert_array_equal(out, cv2.resize(image, (96, 128), interpolation=flag))
    assert p.content_hw == p.input_hw == (128, 96) and p.padding == (0, 0, 0, 0)


def test_normalize_is_rgb_mean_std():
    pixels = torch.tensor([[[[10, 20, 30]]]], dtype=torch.uint8)  # one BGR pixel
    x = transforms.normalize(pixels)
    expected = (torch.tensor([30.0, 20.0, 10.0]) - torch.tensor(transforms.MEAN_RGB)) / torch.tensor(transforms.STD_RGB)
    torch.testing.assert_close(x.view(3), expected, atol=0, rtol=0)


def test_gaussian_kernel_matches_the_formula():
    k = transforms.gaussian_kernel3(0.8, dtype=torch.float64, device=torch.device("cpu"))
    w = np.exp(-np.array([1.0, 0.0, 1.0]) / (2 * 0.8**2))
    w /= w.sum()
    np.testing.assert_allclose(k.numpy(), np.outer(w, w), rtol=1e-12)


def test_gaussian_blur_is_per_channel_with_reflect_border():
    t = torch.rand(1, 3, 9, 7, dtype=torch.float64)
    k = transforms.gaussian_kernel3(0.8, dtype=torch.float64, device=torch.device("cpu"))
    expected = torch.stack([
        F.conv2d(F.pad(t[:, c : c + 1], [1, 1, 1, 1], mode="reflect"), k[None, None])[:, 0] for c in range(3)
    ], dim=1)  # fmt: skip
    torch.testing.assert_close(transforms.gaussian_blur3(t), expected)
    twice = transforms.gaussian_blur3(transforms.gaussian_blur3(t))
    torch.testing.assert_close(transforms.gaussian_blur3(t, passes=2), twice)


def test_smooth_resize_blurs_only_when_growing():
    t = torch.rand(1, 3, 10, 8)
    down = transforms.smooth_resize(t, (5, 8))
    torch.testing.assert_close(down, F.interpolate(t, size=(5, 8), mode="bilinear", align_corners=False))
    up = transforms.smooth_resize(t, (10, 9))  # one side grows: blurred 4 times first
    blurred = transforms.gaussian_blur3(t, passes=4)
    torch.testing.assert_close(up, F.interpolate(blurred, size=(10, 9), mode="bilinear", align_corners=False))


def test_crop_content_inverts_the_padding():
    image = np.zeros((256, 224, 3), np.uint8)
    _, p = transforms.resize_pad(image, (128, 96))
    t = torch.arange(128 * 96, dtype=torch.float32).view(1, 1, 128, 96)
    crop = transforms.crop_content(t, p)
    assert crop.shape[-2:] == (109, 96) and crop[0, 0, 0, 0] == 9 * 96


def test_chunked_argmax_equals_one_argmax_ties_included():
    logits = torch.randn(29, 16, 12)
    logits[5] = logits[3]  # exact ties between 3 and 5 (and after resizing)
    logits[3, :4] = 50.0
    logits[5, :4] = 50.0
    full = F.interpolate(logits[None], size=(37, 23), mode="bilinear", align_corners=False)[0].argmax(0)
    for chunk_bytes in (1, 37 * 23 * 4 * 4, 1 << 30):
        labels = logits_to_labels(logits, (37, 23), chunk_bytes=chunk_bytes)
        torch.testing.assert_close(labels, full, atol=0, rtol=0)
    assert (full[:4 * 37 // 16] == 3).all()
