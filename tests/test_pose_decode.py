"""UDP + DARK decoding and the flip-test merge, against the official parity fixture."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from sapiens2_cli.tasks.pose_decode import (
    decode_heatmaps,
    decode_udp,
    decode_udp_reference,
    flip_merge,
    flip_test,
    gaussian_kernel_1d,
)
from sapiens2_cli.tasks.pose_draw import _vis_data
from sapiens2_cli.tasks.pose_geometry import heatmap_to_input


@pytest.fixture(scope="module")
def parity(fixtures_dir):
    case = fixtures_dir / "parity" / "pose"
    cfg = json.loads((case / "config.json").read_text())
    return cfg, load_file(case / "io.safetensors")


def _to_input(keypoints_hm, cfg):
    codec = cfg["head"]["codec_for_keypoints"]
    w, h = codec["heatmap_size_wh"]
    iw, ih = codec["input_size_wh"]
    return heatmap_to_input(keypoints_hm, heatmap_size=(h, w), input_size=(ih, iw))


def test_gaussian_kernel_is_opencvs():
    expected = cv2.getGaussianKernel(11, 0, ktype=cv2.CV_32F).ravel()
    np.testing.assert_array_equal(gaussian_kernel_1d(11), expected)


def test_reference_decoder_is_bit_identical(parity):
    cfg, io = parity
    keypoints, scores = decode_udp_reference(io["output"])
    assert keypoints.dtype == np.float32
    # The official output is float64 rounded to float32 on storage: compare in float32.
    np.testing.assert_array_equal(_to_input(keypoints, cfg).astype(np.float32), io["keypoints"])
    np.testing.assert_array_equal(scores, io["keypoint_scores"])


@pytest.mark.parametrize("solve_dtype", [torch.float64, torch.float32])
def test_torch_decoder_within_fixture_tolerance(parity, solve_dtype):
    cfg, io = parity
    keypoints, scores = decode_udp(torch.from_numpy(io["output"]), solve_dtype=solve_dtype)
    assert keypoints.dtype == torch.float32 and keypoints.shape == (2, 308, 2)
    stable = io["keypoints_stable"].astype(bool)
    error = np.abs(_to_input(keypoints.numpy(), cfg) - io["keypoints"])[stable]
    # Measured: 5.3e-4 px (float32 rounding of the blur and the log differ from OpenCV/NumPy).
    assert error.max() < 0.02
    assert error.max() < 2e-3
    torch.testing.assert_close(
        scores, torch.from_numpy(io["keypoint_scores"]), atol=cfg["atol"], rtol=0
    )


def test_torch_decoder_chunking_does_not_change_results(parity):
    _, io = parity
    hm = torch.from_numpy(io["output"])
    a, _ = decode_udp(hm, chunk_size=1)
    b, _ = decode_udp(hm, chunk_size=8)
    assert torch.equal(a, b)


def test_decode_heatmaps_on_cpu_is_the_reference(parity):
    _, io = parity
    keypoints, scores = decode_heatmaps(torch.from_numpy(io["output"]))
    ref_kp, ref_scores = decode_udp_reference(io["output"])
    np.testing.assert_array_equal(keypoints, ref_kp)
    np.testing.assert_array_equal(scores, ref_scores)


def _bumps(n, k, h, w, seed):
    """Smooth single-peak heatmaps with sub-pixel centres, like a trained model's."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    cx = rng.uniform(5, w - 6, size=(n, k, 1, 1))
    cy = rng.uniform(5, h - 6, size=(n, k, 1, 1))
    amp = rng.uniform(0.3, 1.0, size=(n, k, 1, 1))
    heat = amp * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 2.0**2))
    return heat.astype(np.float32), np.stack([cx[..., 0, 0], cy[..., 0, 0]], axis=-1)


def test_torch_and_reference_agree_on_smooth_heatmaps():
    heat, centres = _bumps(2, 6, 64, 48, seed=3)
    ref, _ = decode_udp_reference(heat)
    out, _ = decode_udp(torch.from_numpy(heat))
    assert np.abs(out.numpy() - ref).max() < 1e-3
    # DARK recovers the true sub-pixel centre far better than the integer argmax.
    assert np.abs(ref - centres).max() < 0.05


def test_degenerate_maxima_follow_the_official_flat_indexing():
    """A map with max <= 0 decodes from location -1, reading into the previous channel (channel
    0 wraps to the last one); both implementations must do the same."""
    heat, _ = _bumps(1, 4, 20, 16, seed=5)
    heat[0, 0] = -heat[0, 0] - 0.1
    heat[0, 2] = -0.5
    ref, ref_scores = decode_udp_reference(heat)
    out, scores = decode_udp(torch.from_numpy(heat))
    assert ref_scores[0, 0] < 0 and ref_scores[0, 2] == np.float32(-0.5)
    np.testing.assert_array_equal(scores.numpy(), ref_scores)
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-3, equal_nan=True)


def test_flip_merge_matches_the_definition():
    torch.manual_seed(0)
    k = 308
    flip = _vis_data()["flip_indices"]
    plain = torch.randn(2, k, 8, 6)
    flipped = torch.randn(2, k, 8, 6)
    merged = flip_merge(plain, flipped, flip)
    for i in (0, 1, 5, 21, 300):
        expected = (plain[:, i] + flipped[:, flip[i]].flip(-1)) * 0.5
        assert torch.equal(merged[:, i], expected)


def test_flip_merge_of_a_mirrored_prediction_is_the_prediction():
    """A model that is exactly mirror-equivariant gives flipped heatmaps = mirrored, swapped
    heatmaps; merging them must return the plain heatmaps."""
    torch.manual_seed(1)
    flip = torch.tensor(_vis_data()["flip_indices"])
    plain = torch.rand(1, 308, 8, 6)
    flipped = plain.flip(-1)[:, torch.argsort(flip)]
    torch.testing.assert_close(flip_merge(plain, flipped, flip), plain, atol=0, rtol=0)


def test_flip_test_mirrors_the_normalised_input():
    flip = _vis_data()["flip_indices"]
    weights = torch.randn(308, 3, generator=torch.Generator().manual_seed(2))

    def forward(x):  # a toy "model": per-keypoint mix of the colour channels, [N, 308, H, W]
        return torch.einsum("kc,nchw->nkhw", weights, x)

    x = torch.randn(2, 3, 8, 6, generator=torch.Generator().manual_seed(3))
    expected = flip_merge(forward(x), forward(x.flip(-1)), flip)
    assert torch.equal(flip_test(forward, x, flip), expected)
    assert not torch.equal(expected, forward(x))


def test_flip_merge_rejects_mismatches():
    with pytest.raises(ValueError, match="flip indices"):
        flip_merge(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4), [0, 1])
    with pytest.raises(ValueError, match="shapes differ"):
        flip_merge(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 5), [0, 1, 2])
