"""Model-level parity with the official code: every case in $SAPIENS2_FIXTURES/parity.

A new case folder is picked up with no code change. Each Sapiens2 case is loaded strictly
through ``load_model``, with fused and with separate q/k/v projections, and every stored output
must match within the case's atol/rtol.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import fixture_cases
from sapiens2_cli import load_model

CASES = fixture_cases("parity")
MODEL_CASES = [c for c in CASES if (c / "model.safetensors").is_file()]


def test_every_case_is_checked():
    """Sapiens2 cases run here; person-detector cases (an mmdet .pth) run in test_detector.py."""
    unchecked = [c.name for c in CASES if c not in MODEL_CASES and not (c / "model.pth").is_file()]
    assert not unchecked, f"parity cases with no test: {unchecked}"


def test_parity_cases_found():
    assert MODEL_CASES, "no Sapiens2 parity case found"
    assert {json.loads((c / "config.json").read_text())["task"] for c in MODEL_CASES} >= {
        "pretrain", "seg", "pose", "normal", "albedo", "pointmap"
    }  # fmt: skip


@pytest.mark.parametrize("fused", [True, False], ids=["fused_qkv", "separate_qkv"])
@pytest.mark.parametrize("case", MODEL_CASES, ids=lambda p: p.name)
def test_model_parity(case, fused):
    cfg = json.loads((case / "config.json").read_text())
    io = load_file(case / "io.safetensors")
    model = load_model(case / "model.safetensors", fuse_qkv=fused)
    assert model.task == cfg["task"]
    tol = dict(atol=cfg["atol"], rtol=cfg["rtol"])
    x = io["input"]
    with torch.inference_mode():
        if model.task == "pretrain":
            torch.testing.assert_close(model(x), io["output"], **tol)
            raw = model.backbone(x, out="raw")
            torch.testing.assert_close(raw, io["output_raw"], **tol)
            torch.testing.assert_close(model.backbone(x, out="cls"), io["output_cls"], **tol)
            return
        torch.testing.assert_close(model.backbone(x), io["features"], **tol)
        out = model(x)
        if model.task == "pointmap":
            out, scale = out
            torch.testing.assert_close(scale, io["scale"], **tol)
        torch.testing.assert_close(out, io["output"], **tol)
        if model.task == "pose":
            _check_pose_keypoints(cfg, io, out)


def _check_pose_keypoints(cfg, io, heatmaps):
    """Our heatmaps, decoded with our UDP decoder, give the official keypoints."""
    from sapiens2_cli.tasks.pose_decode import decode_udp_reference
    from sapiens2_cli.tasks.pose_geometry import heatmap_to_input

    codec = cfg["head"]["codec_for_keypoints"]
    (w, h), (iw, ih) = codec["heatmap_size_wh"], codec["input_size_wh"]
    keypoints, scores = decode_udp_reference(heatmaps.numpy())
    keypoints = heatmap_to_input(keypoints, heatmap_size=(h, w), input_size=(ih, iw))
    stable = io["keypoints_stable"].bool().numpy()
    assert stable.mean() > 0.9
    expected = io["keypoints"].numpy()
    assert abs(keypoints - expected)[stable].max() <= 0.02
    torch.testing.assert_close(torch.from_numpy(scores), io["keypoint_scores"], atol=cfg["atol"], rtol=0)
