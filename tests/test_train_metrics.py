"""Evaluation metrics on hand-made cases with known answers (training spec §4)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sapiens2_cli.train.keypoints import KeypointSet
from sapiens2_cli.train.metrics import (
    AlbedoMetric,
    NormalMetric,
    PointmapMetric,
    SegMetric,
    to_target_frame,
)
from sapiens2_cli.train.pose_metrics import PoseAPMetric, instance_score, oks_matrix, oks_nms


# --------------------------------------------------------------------------- segmentation
def test_seg_iou_table_by_hand():
    target = torch.tensor([[[0, 0, 1, 1], [1, 2, 2, 255]]])
    pred = torch.tensor([[[0, 1, 1, 1], [2, 2, 0, 0]]])
    metric = SegMetric(4)
    metric.update(pred, target)
    # class 0: I=1, P=3 (one on an ignored pixel is skipped -> 2), G=2 -> U=3
    # class 1: I=2, P=3, G=3 -> U=4;  class 2: I=1, P=2, G=2 -> U=3;  class 3 absent -> 0
    out = metric.compute()
    assert out["per_class_iou"] == pytest.approx([100 / 3, 50.0, 100 / 3, 0.0])
    assert out["per_class_acc"] == pytest.approx([50.0, 100 * 2 / 3, 50.0, 0.0])
    assert out["mIoU"] == pytest.approx((100 / 3 + 50 + 100 / 3) / 4)
    assert out["mAcc"] == pytest.approx((50 + 200 / 3 + 50) / 4)
    assert out["aAcc"] == pytest.approx(100 * 4 / 7)


def test_seg_perfect_from_logits_and_merge():
    target = torch.tensor([[[0, 1], [2, 255]]])
    logits = (
        torch.nn.functional.one_hot(torch.tensor([[[0, 1], [2, 0]]]), 3).permute(0, 3, 1, 2).float()
    )
    a, b = SegMetric(3), SegMetric(3)
    a.update(logits, target)
    b.update(logits, target)
    a.merge(b)
    out = a.compute()
    assert (out["mIoU"], out["mAcc"], out["aAcc"]) == (100.0, 100.0, 100.0)
    assert a.confusion.sum().item() == 6
    with pytest.raises(ValueError, match="label ids outside"):
        SegMetric(2).update(torch.zeros(1, 2, dtype=torch.long), torch.tensor([[0, 7]]))


# --------------------------------------------------------------------------- normals
def _unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg)), 0.0]


def test_normal_angle_statistics_by_hand():
    target = torch.tensor([_unit(0)] * 4).T.reshape(1, 3, 1, 4)
    pred = (
        torch.tensor([_unit(0), _unit(10.2), _unit(90), _unit(45)]).T.reshape(1, 3, 1, 4) * 3.0
    )  # unnormalised
    mask = torch.tensor([[[True, True, True, False]]])
    metric = NormalMetric()
    metric.update(pred, target, mask)
    out = metric.compute()
    assert out["mean"] == pytest.approx(100.2 / 3, rel=1e-6)
    assert out["rmse"] == pytest.approx(math.sqrt((10.2**2 + 90**2) / 3), rel=1e-6)
    assert out["median"] == 10.25  # centre of the 0.5-degree bin holding the middle angle
    assert out["pct_within_5"] == pytest.approx(100 / 3)
    assert out["pct_within_11.25"] == pytest.approx(200 / 3)
    assert out["pct_within_30"] == pytest.approx(200 / 3)
    perfect = NormalMetric()
    perfect.update(target, target, torch.ones(1, 1, 4, dtype=torch.bool))
    assert (
        perfect.compute()["mean"] == pytest.approx(0, abs=1e-6)
        and perfect.compute()["pct_within_5"] == 100
    )


def test_predictions_are_cropped_and_resized_into_the_target_frame():
    pred = torch.zeros(1, 1, 8, 6)
    pred[:, :, 1:7, 1:5] = 1.0  # content inside padding (left 1, right 1, top 1, bottom 1)
    out = to_target_frame(pred, (3, 2), torch.tensor([1, 1, 1, 1]))
    assert out.shape == (1, 1, 3, 2) and torch.equal(out, torch.ones(1, 1, 3, 2))
    metric = NormalMetric()
    pred_n = torch.zeros(1, 3, 8, 6)
    pred_n[:, 2] = -1.0  # padding would point the wrong way
    pred_n[:, 2, 1:7, 1:5] = 1.0
    target = torch.zeros(1, 3, 12, 8)
    target[:, 2] = 1.0
    metric.update(
        pred_n, target, torch.ones(1, 12, 8, dtype=torch.bool), pad=torch.tensor([[1, 1, 1, 1]])
    )
    assert metric.compute()["mean"] == pytest.approx(0, abs=1e-6)


# --------------------------------------------------------------------------- pointmap
def _plane(h: int = 10, w: int = 12) -> torch.Tensor:
    v, u = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    z = 2.0 + 0.1 * u
    return torch.stack([(u - 5.5) * z / 50, (v - 4.5) * z / 50, z])[None]


def test_pointmap_metric_by_hand():
    target = _plane()
    mask = torch.ones(1, 10, 12, dtype=torch.bool)
    metric = PointmapMetric()
    metric.update(target.clone(), target, mask)
    out = metric.compute()
    assert (
        out["l2_mean"] == 0
        and out["within_05_cm"] == 1.0
        and out["normal_mean"] == pytest.approx(0, abs=1e-5)
    )
    defined = metric.sums[9].item()
    assert defined == 8 * 10  # border rows / columns have a zero Sobel derivative (reflect-101)
    shifted = PointmapMetric()
    shifted.update(target + torch.tensor([0.036, 0.0, 0.048]).reshape(1, 3, 1, 1), target, mask)
    out = shifted.compute()
    assert out["l2_mean"] == pytest.approx(0.06) and out["rmse"] == pytest.approx(0.06)
    assert (out["x_mae"], out["y_mae"], out["z_mae"]) == pytest.approx((0.036, 0.0, 0.048))
    assert (out["within_05_cm"], out["within_10_cm"], out["within_20_cm"]) == (0.0, 1.0, 1.0)
    assert out["normal_mean"] == pytest.approx(0, abs=1e-5) and out["normal_pct_within_5"] == 100.0
    tilted = PointmapMetric()
    other = target.clone()
    other[:, 2] = 4.0 - 0.1 * torch.arange(12, dtype=torch.float64)  # opposite slope
    tilted.update(other, target, mask)
    assert tilted.compute()["normal_mean"] > 5.0


# --------------------------------------------------------------------------- albedo
def test_albedo_metric_by_hand():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(1, 3, 16, 16, generator=g) * 0.8
    mask = torch.ones(1, 16, 16, dtype=torch.bool)
    perfect = AlbedoMetric()
    perfect.update(target.clone(), target, mask)
    out = perfect.compute()
    assert out["mae"] == 0 and out["psnr"] == math.inf and out["grad_l1"] == 0
    assert out["ssim"] == pytest.approx(1.0, abs=1e-9)
    offset = AlbedoMetric()
    offset.update(target + 0.1, target, mask)
    out = offset.compute()
    assert out["mae"] == pytest.approx(0.1) and out["rmse"] == pytest.approx(0.1)
    assert out["psnr"] == pytest.approx(20.0) and out["grad_l1"] == pytest.approx(0.0, abs=1e-7)
    assert out["ssim"] < 1.0


def test_albedo_ssim_of_constant_images_and_range():
    target = torch.full((1, 3, 20, 20), 0.6)
    metric = AlbedoMetric()
    metric.update(torch.full((1, 3, 20, 20), 0.5), target, torch.ones(1, 20, 20, dtype=torch.bool))
    c1 = 0.01**2
    assert metric.compute()["ssim"] == pytest.approx(
        (2 * 0.5 * 0.6 + c1) / (0.25 + 0.36 + c1), rel=1e-6
    )
    eight_bit = AlbedoMetric()
    eight_bit.update(
        torch.full((1, 3, 4, 4), 100.0),
        torch.full((1, 3, 4, 4), 110.0),
        torch.ones(1, 4, 4, dtype=torch.bool),
    )
    assert eight_bit.data_range == 255.0
    assert eight_bit.compute()["psnr"] == pytest.approx(10 * math.log10(255**2 / 100))


# --------------------------------------------------------------------------- pose
def test_oks_by_hand():
    sigmas = np.array([0.1, 0.2])
    gt = np.array([[[0.0, 0.0], [10.0, 0.0]]])
    pred = np.array([[[1.0, 0.0], [10.0, 2.0]]])
    # e1 = 1 / (2 * 100 * 0.2^2) = 0.125; e2 = 4 / (2 * 100 * 0.4^2) = 0.125
    oks = oks_matrix(pred, gt, np.array([[1, 1]]), np.array([100.0]), sigmas)
    assert oks[0, 0] == pytest.approx(math.exp(-0.125))
    only_first = oks_matrix(pred, gt, np.array([[1, 0]]), np.array([100.0]), sigmas)
    assert only_first[0, 0] == pytest.approx(math.exp(-0.125))
    assert oks_matrix(pred, gt, np.array([[0, 0]]), np.array([100.0]), sigmas)[0, 0] == 0.0


def test_pose_ap_single_match():
    metric = PoseAPMetric(np.array([0.1, 0.2]), nms_threshold=None)
    metric.add_ground_truth(1, np.array([[0, 0, 2], [10, 0, 2]]), area=100.0)
    metric.add_prediction(1, np.array([[1.0, 0.0], [10.0, 2.0]]), np.array([0.9, 0.9]))
    out = metric.compute()  # OKS 0.8825 matches at thresholds 0.50 ... 0.85 (8 of 10)
    assert out["AP"] == pytest.approx(0.8) and out["AR"] == pytest.approx(0.8)
    # precision tp / (tp + fp + eps) is 1 - 1e-16 for a hit, as in the COCO reference
    assert (
        out["AP50"] == pytest.approx(1.0)
        and out["AP75"] == pytest.approx(1.0)
        and out["AR50"] == 1.0
    )
    assert out["AP_M"] == -1.0 and out["AP_L"] == -1.0  # area 100 is below the medium range


def test_pose_ap_ranking_by_hand():
    sigmas = np.full(3, 0.05)
    person = np.array([[10.0, 10.0], [20.0, 30.0], [30.0, 10.0]])
    metric = PoseAPMetric(sigmas)
    for image_id in (1, 2):
        metric.add_ground_truth(image_id, np.concatenate([person, np.ones((3, 1))], 1), area=5000.0)
    metric.add_prediction(1, person, np.ones(3), score=0.9)  # true positive
    metric.add_prediction(2, person + 500, np.ones(3), score=0.95)  # false positive, ranked first
    metric.add_prediction(2, person, np.ones(3), score=0.5)  # true positive
    # ranking FP, TP, TP: precision 0, 1/2, 2/3 -> monotone 2/3 at every recall point
    out = metric.compute()
    assert out["AP"] == pytest.approx(2 / 3) and out["AR"] == 1.0
    # medium range: the unmatched prediction spans 20 x 20 px < 32^2, so it is ignored there
    assert out["AP_M"] == pytest.approx(1.0) and out["AP_L"] == -1.0


def test_pose_ap_ignores_crowds_and_empty_ground_truths():
    sigmas = np.full(2, 0.05)
    person = np.array([[10.0, 10.0], [40.0, 40.0]])
    metric = PoseAPMetric(sigmas)
    metric.add_ground_truth(1, np.concatenate([person, np.ones((2, 1))], 1), area=900.0)
    metric.add_ground_truth(
        1, np.concatenate([person + 300, np.zeros((2, 1))], 1), area=900.0
    )  # no visible
    metric.add_prediction(1, person, np.ones(2))
    metric.add_prediction(1, person + 300, np.ones(2), score=0.99)  # matches only the ignored one
    assert metric.compute()["AP"] == pytest.approx(1.0)


def test_pose_helpers():
    assert instance_score(np.array([0.1, 0.5, 0.9]), bbox_score=0.5) == pytest.approx(0.35)
    assert instance_score(np.array([0.1, 0.2])) == 0.0
    kpts = np.array(
        [[[0.0, 0.0], [10.0, 10.0]], [[0.5, 0.0], [10.0, 10.5]], [[100.0, 100.0], [120.0, 110.0]]]
    )
    assert oks_nms(kpts, np.array([0.5, 0.9, 0.7]), np.full(2, 0.1), 0.9) == [1, 2]


def test_pose_ap_subsets_of_the_308_set():
    kset = KeypointSet.keypoints308()
    assert {k: len(v) for k, v in kset.groups.items()} == {
        "body": 17,
        "foot": 6,
        "face": 238,
        "left_hand": 20,
        "right_hand": 20,
    }
    rng = np.random.default_rng(0)
    gt = np.concatenate([rng.uniform(100, 400, (308, 2)), np.ones((308, 1))], 1)
    metric = PoseAPMetric(kset.sigmas, subsets=kset.groups)
    metric.add_ground_truth(7, gt, area=300.0 * 300.0)
    pred = gt[:, :2].copy()
    pred[kset.groups["face"]] += 30.0  # face points far off
    metric.add_prediction(7, pred, np.ones(308))
    out = metric.compute()
    assert out["body/AP"] == pytest.approx(1.0) and out["left_hand/AP"] == pytest.approx(1.0)
    assert out["face/AP"] == 0.0
    assert out["AP"] < 1.0 and out["AP_L"] == out["AP"]
