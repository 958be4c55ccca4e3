"""``sapiens2 predict -t pose``: box files through the command line, usage errors, failures per
item and task, skip-existing and shards, overlay sizes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from predict_helpers import files_under, predict, read_json
from sapiens2_cli.engine import image_boundary
from sapiens2_cli.tasks.pose_options import PoseOptions

DATA = Path(__file__).parent / "data"


@pytest.fixture
def photos(tmp_path) -> Path:
    """photos/a.png (256x256) and photos/sub/b.jpg (512x600)."""
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    shutil.copy(DATA / "astronaut.png", root / "a.png")
    shutil.copy(DATA / "grace_hopper.jpg", root / "sub" / "b.jpg")
    return root


MAPPING = {"a.png": [[10, 20, 110, 220, 0.9], [50, 60, 150, 250, 0.2], [0, 0, 100, 100]], "sub/b.jpg": []}
COCO = {
    "images": [{"id": 1, "file_name": "a.png"}, {"id": 7, "file_name": "sub/b.jpg"}],
    "detections": [
        {"image_id": 1, "bbox": [10, 20, 100, 200], "score": 0.9, "category_id": 1},
        {"image_id": 1, "bbox": [50, 60, 100, 190], "score": 0.2, "category_id": 1},
        {"image_id": 1, "bbox": [0, 0, 100, 100]},
    ],
}


@pytest.mark.parametrize("content", [MAPPING, COCO], ids=["mapping", "coco-results"])
def test_box_files(content, photos, tmp_path, tiny_models):
    """Boxes above --bbox-thr in the file's order; an image listed without boxes gets the
    whole-image box with score 0; boxes are looked up by path relative to the input root."""
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps(content))
    out = tmp_path / "out"
    result = predict(photos, "-r", "-t", "pose", "--checkpoint", tiny_models["pose"], "--bboxes", boxes, "-o", out, "-q")
    assert result.exit_code == 0, result.output
    a = read_json(out / "pose" / "a.json")["instances"]
    assert [(p["bbox"], p["bbox_score"]) for p in a] == [([10, 20, 110, 220], pytest.approx(0.9)),
                                                         ([0, 0, 100, 100], 1.0)]  # fmt: skip
    b = read_json(out / "pose" / "sub" / "b.json")
    assert [(p["bbox"], p["bbox_score"]) for p in b["instances"]] == [([0, 0, 511, 599], 0.0)]
    lower = tmp_path / "lower"
    result = predict(photos, "-r", "-t", "pose", "--checkpoint", tiny_models["pose"], "--bboxes", boxes,
                     "--bbox-thr", "0.1", "-o", lower, "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len(read_json(lower / "pose" / "a.json")["instances"]) == 3


@pytest.mark.parametrize(
    ("content", "reason"),
    [('{"a.png": [[1, 2, 3]]}', "a box must be a list"), ("{not json", "not valid JSON"),
     ('{"images": [{"id": 1, "file_name": "a.png"}]}', "needs exactly one of")],
    ids=["short-box", "not-json", "coco-without-results"],
)  # fmt: skip
def test_malformed_box_file_is_a_usage_error_naming_the_file(content, reason, photos, tmp_path, tiny_models):
    boxes = tmp_path / "boxes.json"
    boxes.write_text(content)
    out = tmp_path / "out"
    result = predict(photos, "-r", "-t", "pose", "--checkpoint", tiny_models["pose"], "--bboxes", boxes, "-o", out)
    assert result.exit_code == 2, result.output
    assert f"error: --bboxes {boxes}: " in result.output and reason in result.output
    assert not out.exists()


def test_image_missing_from_the_box_file_fails_for_pose_only(photos, tmp_path, tiny_models):
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"a.png": [[10, 20, 110, 220]]}))
    out = tmp_path / "out"
    result = predict(photos, "-r", "-t", "seg", "-t", "pose", "--checkpoint", f"seg={tiny_models['seg']}",
                     "--checkpoint", f"pose={tiny_models['pose']}", "--bboxes", boxes, "-o", out)  # fmt: skip
    assert result.exit_code == 1, result.output
    reason = f"cannot pre-process ('sub/b.jpg' is not listed in the box file {boxes})"
    assert f"error: {photos / 'sub' / 'b.jpg'}: pose: {reason}" in result.stderr.splitlines()
    assert files_under(out) == {"run.json", "seg/classes.json", "pose/keypoints.json", "seg/a.png", "seg/sub/b.png",
                                "pose/a.json"}  # fmt: skip
    run = read_json(out / "run.json")
    assert run["counts"] == {"total": 2, "ok": 1, "skipped": 0, "failed": 1}
    assert run["per_task"]["seg"]["ok"] == 2 and run["per_task"]["pose"] == {"ok": 1, "skipped": 0, "failed": 1}
    assert run["failures"] == [{"input": str(photos / "sub" / "b.jpg"), "reason": reason, "task": "pose"}]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bboxes", "{tmp}/b.json", "--detector", "none"], "exclude each other"),
        (["--detector", "{tmp}/nope.pth"], "does not exist"),
        (["--bboxes", "{tmp}/missing.json"], "cannot read the box file"),
        (["--radius", "0"], "--radius"),
        (["--keypoint-format", "coco18"], "coco18"),
    ],
    ids=["bboxes-and-detector", "missing-detector", "missing-box-file", "radius", "format"],
)
def test_pose_usage_errors_exit_2(args, message, photos, tmp_path, tiny_models):
    out = tmp_path / "out"
    args = [a.format(tmp=tmp_path) for a in args]
    result = predict(photos / "a.png", "-t", "pose", "--checkpoint", tiny_models["pose"], *args, "-o", out)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (out / "pose").exists()


def test_pose_options_without_pose_are_a_usage_error(photos, tmp_path, tiny_models):
    result = predict(photos / "a.png", "-t", "seg", "--checkpoint", tiny_models["seg"], "--detector", "none",
                     "-o", tmp_path / "out")  # fmt: skip
    assert result.exit_code == 2 and "-t pose is not run" in result.output


def test_bad_inputs_fail_one_by_one(tmp_path, tiny_models):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(DATA / "astronaut.png", folder / "good.png")
    (folder / "fake.png").write_text("not a picture")
    data = (DATA / "grace_hopper.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    result = predict(folder, "-t", "pose", "--checkpoint", tiny_models["pose"], "--detector", "none", "-o", out)
    assert result.exit_code == 1
    errors = sorted(line for line in result.stderr.splitlines() if line.startswith("error: "))
    assert errors == [
        f"error: {folder / 'cut.jpg'}: truncated JPEG (no end-of-image marker after the last scan)",
        f"error: {folder / 'fake.png'}: not an image (unrecognised file signature; expected JPEG, PNG, WebP, BMP or TIFF)",
    ]  # fmt: skip
    assert files_under(out) == {"run.json", "pose/keypoints.json", "pose/good.json"}


def test_skip_existing_shards_and_a_changed_keypoint_format(photos, tmp_path, tiny_models):
    out = tmp_path / "out"
    base = [photos, "-r", "-t", "pose", "--checkpoint", tiny_models["pose"], "--detector", "none", "-o", out, "-q"]
    for index in range(2):
        assert predict(*base, "--shard", f"{index}/2", "--vis").exit_code == 0
    assert files_under(out / "pose") == {"keypoints.json", "a.json", "sub/b.json"}
    assert files_under(out / "vis" / "pose") == {"a.jpg", "sub/b.jpg"}
    assert predict(*base).exit_code == 0
    assert read_json(out / "run.json")["counts"] == {"total": 2, "ok": 0, "skipped": 2, "failed": 0}
    result = predict(*base, "--keypoint-format", "coco17")
    assert result.exit_code == 2 and str(out / "pose" / "keypoints.json") in result.output
    assert read_json(out / "pose" / "keypoints.json")["keypoint_format"] == "goliath308"
    assert predict(*base, "--keypoint-format", "coco17", "--overwrite").exit_code == 0
    assert read_json(out / "pose" / "keypoints.json")["keypoint_format"] == "coco17"
    assert len(read_json(out / "pose" / "a.json")["instances"][0]["keypoints"]) == 17


def test_overlay_sizes_scale_with_the_image():
    auto = PoseOptions()
    assert auto.draw_sizes((256, 256)) == (2, 1)
    assert auto.draw_sizes((1080, 1920)) == (8, 8)
    assert auto.draw_sizes((2160, 3840)) == (16, 16)
    assert PoseOptions(radius=5, thickness=3).draw_sizes((4000, 3000)) == (5, 3)


def test_overlay_draws_on_the_image(photos, tmp_path, tiny_models):
    out = tmp_path / "out"
    result = predict(photos / "a.png", "-t", "pose", "--checkpoint", tiny_models["pose"], "--detector", "none",
                     "--vis", "--kpt-thr", "0", "--radius", "4", "-o", out, "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    drawn = cv2.imread(str(out / "vis" / "pose" / "a.jpg")).astype(int)
    image = cv2.imread(str(photos / "a.png")).astype(int)
    assert drawn.shape == image.shape and np.abs(drawn - image).max() > 100


def test_image_boundary():
    a, b, c = object(), object(), object()
    queue = [(a, 0), (a, 1), (a, 2), (b, 0), (c, 0), (c, 1)]
    assert image_boundary(queue, 1) == 3
    assert image_boundary(queue, 4) == 4
    assert image_boundary(queue, 5) == 6
    assert image_boundary(queue[:2], 8) == 2
