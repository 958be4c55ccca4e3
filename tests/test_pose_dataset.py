"""COCO keypoint folders: keypoint sets, top-down crops, flip pairing, heatmap targets, AP hook."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from train_folders import coco_folder, keypoints308

from sapiens2_cli.train.config import resolve
from sapiens2_cli.train.datasets import build_dataset
from sapiens2_cli.train.files import DataError
from sapiens2_cli.train.keypoints import KeypointSet
from sapiens2_cli.train.pose_augment import (
    box_to_center_size,
    fix_aspect,
    udp_warp_matrix,
)
from sapiens2_cli.train.pose_dataset import PoseCocoDataset

H, W = 64, 48
ALL_OFF = [
    "augment.flip.p=0",
    "augment.half_body.p=0",
    "augment.box_jitter.shift_p=0",
    "augment.box_jitter.scale=0",
    "augment.box_jitter.rotate_p=0",
    "augment.photometric.p=0",
    "augment.blur.p=0",
    "augment.median_blur.p=0",
    "augment.coarse_dropout.p=0",
]


def test_keypoint_sets():
    full = KeypointSet.keypoints308()
    assert len(full) == 308 and full.flip_index[1] == 2 and full.flip_index[0] == 0
    assert np.array_equal(full.flip_index[full.flip_index], np.arange(308))
    assert (len(full.upper), len(full.lower)) == (51, 12)
    small = KeypointSet.from_category(
        {"keypoints": ["nose", "left_eye", "right_eye", "Left_Wrist_x"]}, "f.json"
    )
    assert small.flip_index.tolist() == [0, 2, 1, 3]
    assert small.sigmas is None  # an unknown name leaves sigmas undefined
    named = KeypointSet.from_category({"keypoints": ["nose", "left_eye", "right_eye"]}, "f.json")
    assert named.sigmas.tolist() == [0.026, 0.025, 0.025] and named.upper.tolist() == [0, 1, 2]
    with pytest.raises(DataError, match=r"f.json: flip pair \[0, 9\] does not name two keypoints"):
        KeypointSet.from_category({"keypoints": ["a", "b"], "flip_pairs": [[0, 9]]}, "f.json")


def test_train_crop_matches_the_udp_geometry(tmp_path):
    kp = keypoints308(np.random.default_rng(1))
    root = coco_folder(tmp_path / "pose", [kp])
    cfg = resolve("pose/tiny", ALL_OFF)
    dataset = PoseCocoDataset(root, augment=cfg.augment, input_size=(H, W))
    out = dataset.sample(0, np.random.default_rng(0), train=True)
    assert out["image"].shape == (3, H, W) and out["heatmaps"].shape == (308, 16, 12)
    # expected heatmap peaks: keypoints -> crop (box of visible points x 1.25, aspect 0.75) -> heatmap
    vis = kp[:, 2] > 0
    box = np.concatenate([kp[vis, :2].min(0), kp[vis, :2].max(0)])
    center, size = box_to_center_size(box, 1.25)
    matrix = udp_warp_matrix(center, fix_aspect(size, W / H), 0.0, (W, H))
    crop_xy = kp[:, :2] @ matrix[:, :2].T + matrix[:, 2]
    hm_xy = crop_xy / [(W - 1) / 11, (H - 1) / 15]
    weights = out["keypoint_weights"].numpy()
    assert weights[:40].all() and not weights[40:].any()
    for k in range(0, 40, 7):
        peak = np.unravel_index(out["heatmaps"][k].argmax().item(), (16, 12))
        assert peak == (int(np.floor(hm_xy[k, 1] + 0.5)), int(np.floor(hm_xy[k, 0] + 0.5)))


def test_flip_mirrors_heatmaps_and_swaps_partners(tmp_path):
    root = coco_folder(tmp_path / "pose", [keypoints308(np.random.default_rng(2))])
    plain = PoseCocoDataset(root, augment=resolve("pose/tiny", ALL_OFF).augment, input_size=(H, W))
    flip = PoseCocoDataset(
        root,
        augment=resolve("pose/tiny", [*ALL_OFF, "augment.flip.p=1"]).augment,
        input_size=(H, W),
    )
    a = plain.sample(0, np.random.default_rng(0), train=True)
    b = flip.sample(0, np.random.default_rng(0), train=True)
    partner = KeypointSet.keypoints308().flip_index
    assert torch.equal(b["keypoint_weights"][partner], a["keypoint_weights"])
    assert b["keypoint_weights"][2] == 1 and b["keypoint_weights"][1] == 1  # eyes swap
    assert torch.allclose(b["heatmaps"][partner], a["heatmaps"].flip(-1), atol=1e-5)
    assert (b["image"] - a["image"].flip(-1)).abs().max() < 0.03  # one grey level of interpolation


def test_augmented_samples_are_deterministic(tmp_path):
    root = coco_folder(tmp_path / "pose", [keypoints308(np.random.default_rng(3))])
    cfg = resolve("pose/tiny", [f"data.train={root}", "augment.min_visible_after=0"])
    dataset = build_dataset(cfg, split="train")
    a, b, c = dataset[(0, 11)], dataset[(0, 11)], dataset[(0, 12)]
    assert torch.equal(a["heatmaps"], b["heatmaps"]) and torch.equal(a["image"], b["image"])
    assert not torch.equal(a["image"], c["image"])


def test_load_filters_and_344_layout(tmp_path):
    few = np.zeros((308, 3))
    few[:5] = [[30, 30, 2]] * 5  # 5 visible < min_visible 8
    kp344 = np.zeros((344, 3))
    kp308 = keypoints308(np.random.default_rng(4))
    original = [i if i < 220 else i + 36 for i in range(308)]
    kp344[original] = kp308
    kp344[230] = [1, 1, 2]  # a teeth point: dropped
    root = coco_folder(tmp_path / "pose", [few, kp344], key="goliath_wholebody_kpts")
    dataset = PoseCocoDataset(root, augment=resolve("pose/tiny").augment, input_size=(H, W))
    assert np.array_equal(dataset.instances[1]["keypoints"], kp308)
    assert dataset.sample(0, np.random.default_rng(0), train=True) is None
    grey = coco_folder(tmp_path / "grey", [kp308])
    cv2.imwrite(str(grey / "images" / "p.jpg"), np.full((96, 80, 3), 128, np.uint8))
    assert (
        PoseCocoDataset(grey, augment=resolve("pose/tiny").augment, input_size=(H, W)).sample(
            0, np.random.default_rng(0), train=True
        )
        is None
    )


def test_validation_samples_and_perfect_ap(tmp_path):
    kps = [keypoints308(np.random.default_rng(s)) for s in (5, 6)]
    root = coco_folder(tmp_path / "pose", kps)
    cfg = resolve("pose/tiny", [f"data.val={root}"])
    dataset = build_dataset(cfg, split="val")
    sample = dataset[1]
    assert sample["image_id"] == 1 and sample["ann_id"] == 2 and sample["bbox_score"] == 1.0
    box = np.concatenate([kps[1][:40, :2].min(0), kps[1][:40, :2].max(0)])
    center, size = box_to_center_size(box, 1.25)
    assert sample["center"].numpy() == pytest.approx(center, abs=1e-3)
    assert sample["box_size"].numpy() == pytest.approx(fix_aspect(size, 0.75), abs=1e-3)
    metric = dataset.parts[0][0].metric()
    for kp in kps:
        metric.add_prediction(1, kp[:, :2], np.ones(308))
    out = metric.compute()
    assert out["AP"] == pytest.approx(1.0) and out["body/AP"] == pytest.approx(1.0)


def test_pose_file_errors(tmp_path):
    with pytest.raises(DataError, match="annotations.json: annotation file does not exist"):
        PoseCocoDataset(tmp_path, augment=resolve("pose/tiny").augment, input_size=(H, W))
    root = coco_folder(tmp_path / "a", [keypoints308(np.random.default_rng(0))])
    (root / "images" / "p.jpg").unlink()
    with pytest.raises(DataError, match="1 listed images do not exist"):
        PoseCocoDataset(root, augment=resolve("pose/tiny").augment, input_size=(H, W))
    root = coco_folder(tmp_path / "b", [np.ones((17, 3))])
    with pytest.raises(DataError, match="annotation 1 has 17 keypoints, the category has 308"):
        PoseCocoDataset(root, augment=resolve("pose/tiny").augment, input_size=(H, W))
