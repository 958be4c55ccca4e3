"""Pose crop geometry: box -> UDP crop (e2e parity with the official model input) and back."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from sapiens2_cli.tasks import pose_geometry as geo
from sapiens2_cli.tasks.pose_decode import decode_udp, decode_udp_reference


@pytest.fixture(scope="module")
def e2e(fixtures_dir):
    case = fixtures_dir / "e2e" / "pose"
    return {
        "config": json.loads((case / "config.json").read_text()),
        "pose": json.loads((case / "pose.json").read_text()),
        "inter": load_file(case / "intermediates.safetensors"),
        "image": cv2.imread(str(case / "image.png"), cv2.IMREAD_COLOR),
    }


def test_center_scale_and_aspect_fix_match_the_official_crop(e2e):
    cfg, crop = e2e["config"], e2e["pose"]["crop"]
    h, w = cfg["model_input_hw"]
    g = geo.crop_geometry(np.array(cfg["bbox_xyxy"]), input_size=(h, w))
    assert g.center.dtype == np.float32 and g.scale.dtype == np.float32
    np.testing.assert_array_equal(g.center, np.float32(crop["bbox_center"]))
    # 316.6666564941406 is float32(237.5 / 0.75): the aspect fix grows the height here.
    np.testing.assert_array_equal(g.scale, np.float32(crop["bbox_scale_after_padding_and_aspect"]))
    assert crop["input_size_wh"] == [w, h]


def test_aspect_fix_grows_the_short_side():
    wide = geo.fix_aspect_ratio(np.array([300.0, 100.0], np.float32), aspect_ratio=0.75)
    tall = geo.fix_aspect_ratio(np.array([30.0, 100.0], np.float32), aspect_ratio=0.75)
    np.testing.assert_array_equal(wide, np.float32([300.0, 400.0]))
    np.testing.assert_array_equal(tall, np.float32([75.0, 100.0]))


def test_udp_matrix_is_float32_arithmetic():
    center, scale = np.float32([101.0, 131.5]), np.float32([237.5, 316.66666])
    m = geo.udp_warp_matrix(center, scale, input_size=(1024, 768))
    f = np.float32
    sx, sy = f(767) / scale[0], f(1023) / scale[1]
    expected = np.array(
        [[sx, 0, sx * (-f(0.5) * (center[0] * 2) + f(0.5) * scale[0])],
         [0, sy, sy * (-f(0.5) * (center[1] * 2) + f(0.5) * scale[1])]],
        dtype=np.float32,
    )  # fmt: skip
    assert m.dtype == np.float32
    np.testing.assert_array_equal(m, expected)
    # Box edges land on the first and last pixel centres.
    left_top = m @ np.array([center[0] - scale[0] / 2, center[1] - scale[1] / 2, 1.0])
    right_bottom = m @ np.array([center[0] + scale[0] / 2, center[1] + scale[1] / 2, 1.0])
    np.testing.assert_allclose(left_top, [0, 0], atol=1e-3)
    np.testing.assert_allclose(right_bottom, [767, 1023], atol=1e-3)


def test_interpolation_flag():
    shrink = geo.udp_warp_matrix(
        np.float32([500, 500]), np.float32([900, 1200]), input_size=(1024, 768)
    )
    enlarge = geo.udp_warp_matrix(
        np.float32([50, 50]), np.float32([90, 120]), input_size=(1024, 768)
    )
    assert geo.warp_interpolation(shrink) == cv2.INTER_AREA
    assert geo.warp_interpolation(enlarge) == cv2.INTER_CUBIC


def test_e2e_crop_and_normalisation_equal_the_official_model_input(e2e):
    cfg = e2e["config"]
    size = tuple(cfg["model_input_hw"])
    crop, g = geo.crop_person(e2e["image"], np.array(cfg["bbox_xyxy"]), input_size=size)
    x = geo.normalize_crops(crop[None])
    expected = torch.from_numpy(e2e["inter"]["input"])
    torch.testing.assert_close(x, expected, atol=1e-6, rtol=0)
    assert torch.equal(x, expected)  # same ops, same order: bit-identical
    # The bilinear-vs-cubic choice is visible in the input: the wrong flag fails.
    wrong = cv2.warpAffine(e2e["image"], g.matrix, size[::-1], flags=cv2.INTER_CUBIC)
    assert (geo.normalize_crops(wrong[None]) - expected).abs().max() > 1e-2


def test_crop_people_batches_and_pads_outside_with_zero():
    rng = np.random.default_rng(0)
    image = rng.integers(1, 256, size=(60, 50, 3), dtype=np.uint8)
    boxes = np.array([[5, 5, 30, 50, 0.9], [40, 40, 80, 90, 0.5]], dtype=np.float32)
    crops, geometries = geo.crop_people(image, boxes, input_size=(32, 24))
    assert crops.shape == (2, 32, 24, 3) and crops.dtype == np.uint8 and len(geometries) == 2
    for i, box in enumerate(boxes):
        single, g = geo.crop_person(image, box, input_size=(32, 24))
        np.testing.assert_array_equal(crops[i], single)
        np.testing.assert_array_equal(g.matrix, geometries[i].matrix)
    assert (crops[1][-4:, -4:] == 0).all()  # beyond the image: constant 0 border
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        geo.crop_people(image, np.zeros((2, 3)), input_size=(32, 24))


def test_back_projection_divides_by_w_not_w_minus_1():
    """u = (W-1)/sw (x - cx + sw/2) maps back with u/W: a pure-geometry round trip is off by
    the factor (W-1)/W around the box's top-left corner, as in the official code."""
    center, scale, size = np.float32([100, 200]), np.float32([150, 200]), (1024, 768)
    m = geo.udp_warp_matrix(center, scale, input_size=size).astype(np.float64)
    x = np.array([[130.0, 170.0], [60.0, 290.0]])
    uv = x @ m[:, :2].T + m[:, 2]
    back = geo.input_to_image(uv[None], center=center[None], scale=scale[None], input_size=size)[0]
    corner = center.astype(np.float64) - scale / 2
    np.testing.assert_allclose(
        back, corner + (x - corner) * np.array([767 / 768, 1023 / 1024]), atol=1e-4
    )


def test_heatmap_to_input_uses_udp_scaling():
    kp = np.array([[[0.0, 0.0], [191.0, 255.0], [95.5, 127.5]]], dtype=np.float32)
    out = geo.heatmap_to_input(kp, heatmap_size=(256, 192), input_size=(1024, 768))
    assert out.dtype == np.float64
    np.testing.assert_allclose(out[0], [[0, 0], [768, 1024], [384, 512]])


def test_e2e_decode_and_back_projection_match_pose_json(e2e):
    """Flip-averaged heatmaps from the official run -> our decoders -> image pixels."""
    cfg, pose = e2e["config"], e2e["pose"]
    size = tuple(cfg["model_input_hw"])
    heatmaps = e2e["inter"]["heatmaps_flip_avg"]  # [1, 308, 32, 24]
    g = geo.crop_geometry(np.array(cfg["bbox_xyxy"]), input_size=size)
    expected = np.array(pose["keypoints"])
    stable = np.array(pose["keypoints_stable"], dtype=bool)
    assert stable.sum() > 290

    kp_ref, scores_ref = decode_udp_reference(heatmaps)
    image_ref = geo.heatmap_to_image(kp_ref, [g], heatmap_size=heatmaps.shape[2:])[0]
    np.testing.assert_array_equal(image_ref, expected)  # bit-identical, every keypoint
    np.testing.assert_array_equal(scores_ref[0], np.float32(pose["keypoint_scores"]))

    tol = cfg["tolerance"]
    for solve_dtype in (torch.float64, torch.float32):
        kp, scores = decode_udp(torch.from_numpy(heatmaps), solve_dtype=solve_dtype)
        image = geo.heatmap_to_image(kp.numpy(), [g], heatmap_size=heatmaps.shape[2:])[0]
        error = np.abs(image - expected)[stable].max()
        assert error < tol["keypoints_atol_px"], (solve_dtype, error)
        np.testing.assert_allclose(
            scores[0].numpy(), pose["keypoint_scores"], atol=tol["scores_atol"], rtol=0
        )


def test_normalize_rejects_non_uint8():
    with pytest.raises(ValueError, match="uint8"):
        geo.normalize_crops(np.zeros((1, 8, 6, 3), dtype=np.float32))
