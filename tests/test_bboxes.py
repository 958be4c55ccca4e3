"""``--bboxes`` files, the demo's "+1" greedy NMS and the whole-image fallback."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from sapiens2_cli.tasks.bboxes import (
    BoxFileError,
    load_bboxes,
    nms_xyxy,
    select_person_boxes,
    whole_image_box,
)


def _write(tmp_path, data, name="boxes.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


# ---------------------------------------------------------------- file shapes

IMAGE = {"id": 1, "file_name": "a.jpg"}


def _coco(entries, key="annotations"):
    return {"images": [IMAGE], key: entries}


def test_mapping_file(tmp_path):
    path = _write(tmp_path, {"./a/b.jpg": [[1, 2, 30, 40], [5, 6, 7, 8, 0.25]], "c.png": []})
    boxes = load_bboxes(path)
    np.testing.assert_array_equal(
        boxes.boxes_for("a/b.jpg"), np.float32([[1, 2, 30, 40, 1], [5, 6, 7, 8, 0.25]])
    )
    assert boxes.boxes_for("a\\b.jpg") is boxes.boxes_for("a/b.jpg")
    assert boxes.boxes_for("c.png").shape == (0, 5)
    assert boxes.boxes_for("missing.jpg") is None
    assert boxes.boxes_for("elsewhere/b.jpg") is boxes.boxes_for("a/b.jpg")  # unique file name


def test_ambiguous_file_name_is_an_error(tmp_path):
    boxes = load_bboxes(_write(tmp_path, {"x/a.jpg": [], "y/a.jpg": []}))
    with pytest.raises(BoxFileError, match="matches several entries"):
        boxes.boxes_for("z/a.jpg")


def test_coco_ground_truth_file(tmp_path):
    data = {
        "images": [{"id": 7, "file_name": "p/one.jpg"}, {"id": 9, "file_name": "two.jpg"}],
        "annotations": [
            {"image_id": 7, "bbox": [10, 20, 30, 40], "category_id": 3},
            {"image_id": 7, "bbox": [1, 2, 3, 4], "category_id": 5},  # not a person
            {"image_id": 7, "bbox": [0, 0, 99, 99], "category_id": 3, "iscrowd": 1},
        ],
        "categories": [{"id": 3, "name": "person"}, {"id": 5, "name": "dog"}],
    }
    boxes = load_bboxes(_write(tmp_path, data))
    np.testing.assert_array_equal(boxes.boxes_for("p/one.jpg"), np.float32([[10, 20, 40, 60, 1]]))
    assert boxes.boxes_for("two.jpg").shape == (0, 5)


def test_coco_results_next_to_images(tmp_path):
    data = {
        "images": [{"id": 1, "file_name": "a.jpg"}],
        "detections": [
            {"image_id": 1, "bbox": [0.5, 1.5, 10, 20], "score": 0.9, "category_id": 1},
            {"image_id": 1, "bbox": [5, 5, 1, 1], "score": 0.4},
            {"image_id": 1, "bbox": [5, 5, 1, 1], "score": 0.8, "category_id": 2},
        ],
    }
    boxes = load_bboxes(_write(tmp_path, data))
    np.testing.assert_array_equal(
        boxes.boxes_for("a.jpg"), np.float32([[0.5, 1.5, 10.5, 21.5, 0.9], [5, 5, 6, 6, 0.4]])
    )


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("{not json", "not valid JSON"),
        ("[]", "bare COCO results list has no file names"),
        ('"text"', "expected a JSON object"),
        ({"a.jpg": [[1, 2, 3]]}, r"entry 'a.jpg' box 0: a box must be a list \[x1, y1, x2, y2\]"),
        ({"a.jpg": [[10, 2, 3, 4]]}, "x2 < x1 or y2 < y1"),
        ({"a.jpg": [[1, 2, "3", 4]]}, "'3' is not a finite number"),
        ({"a.jpg": [[1, 2, 3, float("nan")]]}, "not a finite number"),
        ({"a.jpg": {"bbox": [1, 2, 3, 4]}}, "expected a list of boxes, got dict"),
        ({"./a.jpg": [], "a.jpg": []}, "listed twice"),
        ({"images": [IMAGE]}, "needs exactly one of"),
        ({"images": [{"id": 1}], "annotations": []}, r"images\[0\] needs an 'id' and a 'file_name"),
        ({"images": [IMAGE, IMAGE], "annotations": []}, "appears twice"),
        (_coco([{"image_id": 2, "bbox": [0, 0, 1, 1]}]), r"annotations\[0\]: image_id 2 is not in"),
        (_coco([{"image_id": 1, "bbox": [0, 0, -1, 1]}], "results"), "negative width or height"),
        (_coco([{"image_id": 1, "bbox": [0, 0, 1]}], "results"), r"'bbox' must be \[x, y, w, h\]"),
        (_coco([{"image_id": 1}], "detections"), r"detections\[0\] needs 'image_id' and 'bbox'"),
        (_coco([{"image_id": [1], "bbox": [0, 0, 1, 1]}]), r"image_id \[1\] is not in 'images'"),
        ({"images": [{"id": {}, "file_name": "a"}], "annotations": []}, "needs an 'id'"),
        ({**_coco([]), "categories": [{"id": 1, "name": "dog"}]}, "exactly one 'person' category"),
    ],
)  # fmt: skip
def test_malformed_files_name_file_and_reason(tmp_path, content, reason):
    path = _write(tmp_path, content)
    with pytest.raises(BoxFileError, match=reason) as err:
        load_bboxes(path)
    assert str(err.value).startswith(f"{path}: ")


def test_unreadable_file(tmp_path):
    with pytest.raises(BoxFileError, match="cannot read the box file"):
        load_bboxes(tmp_path / "absent.json")


# ---------------------------------------------------------------- NMS


def test_nms_uses_the_plus_one_convention():
    """[0,0,9,9] vs [6,0,15,9]: with "+1", inter 4*10 = 40, areas 100, IoU 0.25; without it,
    inter 3*9 = 27, areas 81, IoU 0.2. A threshold between the two tells them apart."""
    boxes = np.float32([[0, 0, 9, 9], [6, 0, 15, 9]])
    scores = np.float32([0.9, 0.8])
    assert nms_xyxy(boxes, scores, 0.3).tolist() == [0, 1]
    assert nms_xyxy(boxes, scores, 0.21).tolist() == [0]


def test_nms_keeps_at_threshold_and_orders_by_score():
    boxes = np.float32([[0, 0, 9, 9], [50, 50, 60, 60], [6, 0, 15, 9], [100, 0, 110, 10]])
    scores = np.float32([0.5, 0.9, 0.7, 0.6])
    assert nms_xyxy(boxes, scores, 0.25).tolist() == [1, 2, 3, 0]  # IoU exactly 0.25 survives
    assert nms_xyxy(boxes, scores, 0.2).tolist() == [1, 2, 3]
    assert nms_xyxy(np.zeros((0, 4)), np.zeros(0)).tolist() == []


def test_detector_fixture_selection(fixtures_dir):
    """The pose demo's filter + NMS on mmdet's detections gives its stored boxes."""
    case = fixtures_dir / "parity" / "detector"
    io = load_file(case / "io.safetensors")
    cfg = json.loads((case / "config.json").read_text())
    boxes, scores = io["det_bboxes"], io["det_scores"]
    kept = select_person_boxes(
        boxes, scores, image_hw=tuple(cfg["image"]["crop_yxhw"][2:]),
        score_threshold=cfg["vis_pose"]["bbox_thr"], iou_threshold=cfg["vis_pose"]["nms_thr"],
    )  # fmt: skip
    np.testing.assert_array_equal(kept, io["vis_bboxes"])
    above = np.flatnonzero(scores > np.float32(0.3))
    np.testing.assert_array_equal(
        above[nms_xyxy(boxes[above], scores[above], 0.3)], io["vis_keep_idx"]
    )


def test_fallback_and_no_nms_mode():
    np.testing.assert_array_equal(whole_image_box(480, 640), np.float32([[0, 0, 639, 479]]))
    out = select_person_boxes(np.float32([[0, 0, 5, 5]]), np.float32([0.3]), image_hw=(10, 20))
    np.testing.assert_array_equal(out, np.float32([[0, 0, 19, 9]]))  # score must be > 0.3
    same = np.float32([[0, 0, 10, 10], [1, 1, 11, 11], [2, 2, 12, 12]])
    out = select_person_boxes(same, np.float32([1, 1, 1]), image_hw=(20, 20), iou_threshold=None)
    np.testing.assert_array_equal(out, same)  # user boxes: kept, file order among equal scores
