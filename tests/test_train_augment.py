"""Augmentation primitives: photometric ops and geometric ops on image + targets + intrinsics."""

from __future__ import annotations

import numpy as np
import pytest

from sapiens2_cli.train import photometric as photo
from sapiens2_cli.train.augment import (
    DenseSample,
    random_crop,
    random_rotate,
    resize_pad,
    seg_random_crop,
)
from sapiens2_cli.train.task_config import (
    CoarseDropout,
    DownUp,
    Photometric,
    RandomCrop,
    Rotate,
    SegCrop,
    Solarize,
)


def _image(h: int = 32, w: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(40, 200, (h, w, 3), dtype=np.uint8)


def test_solarize_and_probability_zero():
    image = np.array([[[0, 127, 128]], [[200, 255, 10]]], np.uint8)
    out = photo.solarize(image, np.random.default_rng(0), Solarize(p=1.0, threshold=128))
    assert out.tolist() == [[[0, 127, 127]], [[55, 0, 10]]]
    assert photo.solarize(image, np.random.default_rng(0), Solarize(p=0.0)) is image


def test_brightness_only_distortion_is_a_bounded_constant_shift():
    cfg = Photometric(p=1.0, brightness=32.0, contrast=(1.0, 1.0), saturation=(1.0, 1.0), hue=0.0)
    image = _image()
    shifts = set()
    for seed in range(20):
        out = photo.photometric_distortion(image, np.random.default_rng(seed), cfg).astype(int)
        delta = np.unique(out - image.astype(int))
        # hue/saturation round trips through HSV may move a pixel by a grey level or two
        assert delta.max() - delta.min() <= 6 and abs(np.median(out - image.astype(int))) <= 33
        shifts.add(int(np.median(out - image.astype(int))))
    assert len(shifts) > 5  # brightness is actually drawn


def test_coarse_dropout_zeroes_one_rectangle():
    image = np.full((50, 40, 3), 9, np.uint8)
    out = photo.coarse_dropout(
        image, np.random.default_rng(1), CoarseDropout(p=1.0, holes=1, size=(0.2, 0.4))
    )
    rows, cols = np.nonzero((out == 0).all(-1))
    h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert (out == 0).all(-1).sum() == h * w
    assert 0.2 * 50 - 1 <= h <= 0.4 * 50 and 0.2 * 40 - 1 <= w <= 0.4 * 40


def test_down_up_keeps_size_and_is_seeded():
    image = _image()
    a = photo.down_up(image, np.random.default_rng(4), DownUp(p=1.0))
    b = photo.down_up(image, np.random.default_rng(4), DownUp(p=1.0))
    assert a.shape == image.shape and np.array_equal(a, b) and not np.array_equal(a, image)


def test_resize_pad_moves_intrinsics_with_the_pixels():
    k = np.array([[30.0, 0, 11.5], [0, 31.0, 19.5], [0, 0, 1]])
    depth = np.zeros((40, 24), np.float32)
    depth[19, 11] = 5.0
    sample = DenseSample(
        image=_image(40, 24),
        maps={"depth": depth, "mask": np.ones((40, 24), np.uint8)},
        intrinsics=k,
    )
    out = resize_pad(sample, (64, 48))
    # s = 1.6: 24 -> 38 (rx = 38 / 24), 40 -> 64; pad 5 left / 5 right
    rx = 38 / 24
    assert out.pad == (5, 5, 0, 0) and out.image.shape == (64, 48, 3)
    assert out.intrinsics[0, 0] == pytest.approx(30 * rx) and out.intrinsics[0, 2] == pytest.approx(
        11.5 * rx + 5
    )
    assert out.intrinsics[1, 1] == pytest.approx(31 * 1.6) and out.intrinsics[
        1, 2
    ] == pytest.approx(19.5 * 1.6)
    assert out.maps["mask"][:, :5].sum() == 0 and out.maps["mask"][:, 5:43].all()
    assert set(np.unique(out.maps["depth"]).tolist()) == {0.0, 5.0}  # nearest: no blended depths


def test_random_crop_shifts_the_principal_point():
    k = np.array([[30.0, 0, 11.5], [0, 30.0, 15.5], [0, 0, 1]])
    image = _image(32, 24)
    sample = DenseSample(image=image, maps={"mask": np.ones((32, 24), np.uint8)}, intrinsics=k)
    out = random_crop(sample, np.random.default_rng(0), RandomCrop(p=1.0))
    h, w = out.size
    assert 0.4 * 32 * 24 * 0.9 <= h * w <= 32 * 24 and (h, w) != (32, 24)
    # find the crop offset from the image content and check K moved by it
    for y0 in range(32 - h + 1):
        for x0 in range(24 - w + 1):
            if np.array_equal(image[y0 : y0 + h, x0 : x0 + w], out.image):
                assert out.intrinsics[0, 2] == 11.5 - x0 and out.intrinsics[1, 2] == 15.5 - y0
                return
    raise AssertionError("crop not found in the source image")


def test_seg_crop_pads_small_images_with_ignore():
    label = np.full((20, 10), 3, np.uint8)
    label[:, :5] = 7
    sample = DenseSample(image=_image(20, 10), maps={"label": label})
    out = seg_random_crop(sample, np.random.default_rng(0), SegCrop(p=1.0), (32, 24))
    assert out.size == (32, 24)
    assert (out.maps["label"][20:] == 255).all() and (out.maps["label"][:, 10:] == 255).all()
    assert (out.image[20:] == 0).all() and np.array_equal(out.maps["label"][:20, :10], label)


def test_rotation_fills_labels_with_background():
    label = np.full((30, 30), 4, np.uint8)
    sample = DenseSample(image=np.full((30, 30, 3), 200, np.uint8), maps={"label": label})
    out = random_rotate(sample, np.random.default_rng(3), Rotate(p=1.0, max_degrees=60))
    assert set(np.unique(out.maps["label"]).tolist()) == {0, 4}
    assert out.maps["label"][15, 15] == 4 and (out.image[out.maps["label"] == 0] < 200).all()
