"""The dense e2e fixtures through the real command line: image file in, written files compared.

Each dense case in ``$SAPIENS2_FIXTURES/e2e`` runs as
``sapiens2 predict image.png -t TASK --checkpoint model --input-size HxW --format F -o OUT``;
the files are read back and compared with the official outputs within the case's tolerance.
"""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from conftest import fixture_cases
from sapiens2_cli.cli import main
from sapiens2_cli.exr import read_exr
from sapiens2_cli.readers import read_image
from sapiens2_cli.tasks import TASKS
from sapiens2_cli.transforms import normalize

DENSE_TASKS = set(TASKS) - {"pose", "pretrain"}  # pose: test_predict_pose.py; pretrain: the backbone parity cases
CASES = [c for c in fixture_cases("e2e") if json.loads((c / "config.json").read_text())["task"] in DENSE_TASKS]


def config(case):
    return json.loads((case / "config.json").read_text())


def test_every_dense_task_has_an_e2e_case():
    assert {config(c)["task"] for c in CASES} == DENSE_TASKS


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.name)
def test_model_input_matches_the_official_one(case):
    cfg = config(case)
    inputs = TASKS[cfg["task"]].prepare(read_image(case / "image.png"), tuple(cfg["model_input_hw"]))
    x = normalize(torch.from_numpy(np.stack([i.pixels for i in inputs])))
    expected = load_file(case / "intermediates.safetensors")["input"]
    torch.testing.assert_close(x, expected, atol=1e-6, rtol=0)
    pads = [s for s in cfg["preprocess"] if s["step"] == "pad"]
    if pads:
        assert list(inputs[0].geometry.padding) == pads[0]["padding_left_right_top_bottom"]


def read_main(out, task, fmt):
    """The main output array of ``image.png`` as written."""
    if fmt == "npy":
        return np.load(out / task / "image.npy")
    if task == "seg":
        return cv2.imread(str(out / "seg" / "image.png"), cv2.IMREAD_UNCHANGED)
    array, names = read_exr(out / task / "image.exr")
    assert names == (["R", "G", "B"] if task == "albedo" else ["X", "Y", "Z"])
    return array


@pytest.mark.parametrize("fmt", ["exr", "npy"])
@pytest.mark.parametrize("case", CASES, ids=lambda p: p.name)
def test_e2e_case_through_the_cli(case, fmt, tmp_path):
    cfg = config(case)
    task, (h, w) = cfg["task"], cfg["model_input_hw"]
    model = (case / cfg["model_file"]).resolve()
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [
        "predict", str(case / "image.png"), "-t", task, "--checkpoint", str(model),
        "--input-size", f"{h}x{w}", "--format", fmt, "-o", str(out), "--quiet",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    got = read_main(out, task, fmt)
    tol = cfg["tolerance"]
    if task == "seg":
        expected = cv2.imread(str(case / "seg_labels.png"), cv2.IMREAD_UNCHANGED)
        checked = cv2.imread(str(case / "seg_ambiguous.png"), cv2.IMREAD_UNCHANGED) == 0
        assert got.dtype == np.uint8 and got.shape == expected.shape
        assert int((got != expected)[checked].sum()) == tol["legit_mismatches_outside_ambiguous"] == 0
        return
    expected = np.load(case / f"{task}.npy")
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=tol["atol"], rtol=tol["rtol"])
    if task == "albedo":
        png = cv2.imread(str(out / "albedo" / "image.png"), cv2.IMREAD_UNCHANGED)
        official = cv2.imread(str(case / "albedo.png"), cv2.IMREAD_UNCHANGED)
        assert png.shape == official.shape
        assert np.abs(png.astype(int) - official).max() <= tol["legit_u8_max_abs"]
    if task == "pointmap":
        meta = json.loads((out / "pointmap" / "image.json").read_text())
        scale = float(load_file(case / "intermediates.safetensors")["scale"])
        assert meta["scale"] == pytest.approx(scale, rel=1e-5)
        assert meta["focal_length_input_px"] == pytest.approx(768.0 / scale, rel=1e-5)
        # 256x224 image into 144x80: s = min(80/224, 144/256) = 80/224
        assert meta["focal_length_px"] == pytest.approx(768.0 / scale * 224 / 80, rel=1e-5)


@pytest.mark.parametrize("case", [c for c in CASES if config(c)["task"] != "seg"], ids=lambda p: p.name)
def test_postprocessing_of_the_official_raw_output(case):
    """From the official model's stored raw output, the post-processing alone reproduces the
    official map (the remaining e2e deviation is the model's float rounding)."""
    cfg = config(case)
    task = TASKS[cfg["task"]]
    image = read_image(case / "image.png")
    inputs = task.prepare(image, tuple(cfg["model_input_hw"]))
    inter = load_file(case / "intermediates.safetensors")
    raw = (inter["raw_output"][0], inter["scale"][0]) if cfg["task"] == "pointmap" else inter["raw_output"][0]
    pred = task.postprocess([raw], inputs, image.shape[:2])
    got = pred[{"normal": "normals", "albedo": "albedo", "pointmap": "points"}[cfg["task"]]]
    np.testing.assert_allclose(got, np.load(case / f"{cfg['task']}.npy"), atol=1e-6, rtol=0)
