"""Exported artifacts and fine-tuned checkpoints run through `sapiens2 predict` like the release files."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import FIXTURES
from finetune_runs import tiny_run
from sapiens2_cli.cli import main
from sapiens2_cli.export import export_model

CASE = FIXTURES / "e2e" / "normal"


def predict(*args):
    return CliRunner().invoke(main, ["predict", *map(str, args), "--quiet"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The eager model's prediction of the e2e normal case (itself checked against the official one)."""
    cfg = json.loads((CASE / "config.json").read_text())
    out = tmp_path_factory.mktemp("eager")
    model = (CASE / cfg["model_file"]).resolve()
    h, w = cfg["model_input_hw"]
    result = predict(CASE / "image.png", "-t", "normal", "--checkpoint", model, "--input-size", f"{h}x{w}",
                     "--format", "npy", "-o", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    return model, (h, w), np.load(out / "normal" / "image.npy")


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_exported_artifact_predicts_like_the_model(fmt, reference, tmp_path):
    model, (h, w), expected = reference
    artifact = tmp_path / f"normal.{fmt}"
    export_model(str(model), artifact, input_size=(h, w))
    out = tmp_path / "out"
    # no --task and no --input-size: both come from the artifact's own metadata
    result = predict(CASE / "image.png", "--checkpoint", artifact, "--format", "npy", "-o", out)
    assert result.exit_code == 0, result.output
    got = np.load(out / "normal" / "image.npy")
    assert np.abs(got - expected).max() < 1e-4
    run = json.loads((out / "run.json").read_text())
    assert run["models"]["normal"]["format"] == fmt


def test_wrong_task_for_an_artifact_is_a_usage_error(reference, tmp_path):
    model, (h, w), _ = reference
    artifact = tmp_path / "normal.onnx"
    export_model(str(model), artifact, input_size=(h, w))
    result = predict(CASE / "image.png", "-t", "seg", "--checkpoint", artifact, "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert "holds a normal model, not seg" in result.output


def test_finetuned_checkpoint_predicts_through_the_cli(tmp_path):
    run = tiny_run(tmp_path, "seg")
    image = tmp_path / "photo.png"
    cv2.imwrite(str(image), cv2.resize(cv2.imread(str(CASE / "image.png")), (96, 128)))
    out = tmp_path / "out"
    result = predict(image, "--checkpoint", run / "final.safetensors", "-o", out)
    assert result.exit_code == 0, result.output
    labels = cv2.imread(str(out / "seg" / "photo.png"), cv2.IMREAD_UNCHANGED)
    assert labels.shape == (128, 96) and labels.dtype == np.uint8
    classes = json.loads((out / "seg" / "classes.json").read_text())
    from sapiens2_cli import load_model

    names = json.loads(load_model(run / "final.safetensors").info.metadata["class_names"])
    assert [c["name"] for c in classes["classes"]] == names  # the fine-tune's own class list
    assert labels.max() < len(names)


def test_seg_outputs_follow_a_finetune_class_list():
    from types import SimpleNamespace

    from sapiens2_cli.tasks import TASKS

    info = SimpleNamespace(head=SimpleNamespace(out_channels=3), metadata={"class_names": '["Background", "Hair", "Hat"]'})
    task = TASKS["seg"].for_model(SimpleNamespace(info=info))
    table = task.run_files()["classes.json"].data["classes"]
    assert [c["name"] for c in table] == ["Background", "Hair", "Hat"]
    released = {c["name"]: c["color_rgb"] for c in TASKS["seg"].run_files()["classes.json"].data["classes"]}
    assert table[1]["color_rgb"] == released["Hair"] and table[2]["color_rgb"] not in released.values()
    overlay = task.overlay(np.zeros((32, 24, 3), np.uint8), np.array([[0, 1], [2, 2]], np.uint8).repeat(16, 0).repeat(12, 1))
    assert overlay.shape[0] == 32
    unnamed = TASKS["seg"].for_model(SimpleNamespace(info=SimpleNamespace(head=SimpleNamespace(out_channels=4), metadata={})))
    assert [c["name"] for c in unnamed.classes] == ["class_0", "class_1", "class_2", "class_3"]
