"""Every loss against its formula on hand-made tensors (training spec §2)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sapiens2_cli.train.config import resolve
from sapiens2_cli.train.heatmaps import udp_heatmaps
from sapiens2_cli.train.losses import (
    albedo_loss,
    build_loss,
    heatmap_mse_loss,
    normal_loss,
    seg29_class_weights,
    seg_loss,
)
from sapiens2_cli.train.pointmap_loss import pointmap_loss
from sapiens2_cli.train.task_config import PointmapLoss

LOG3 = math.log(3.0)


# --------------------------------------------------------------------------- segmentation
def test_seg29_class_weights_table():
    w = seg29_class_weights()
    assert len(w) == 29 and w[0] == 0.1 and w[1] == 10 and w[9] == 6 and w[22] == 1


def test_seg_cross_entropy_is_weighted_and_averaged_over_all_pixels():
    logits = torch.zeros(1, 3, 1, 2)  # uniform softmax: -log p = log 3 everywhere
    target = torch.tensor([[[0, 1]]])
    out = seg_loss(logits, target, class_weights=[0.5, 2.0, 7.0], dice_weight=0.0)
    assert out["loss_ce"].item() == pytest.approx((0.5 + 2.0) * LOG3 / 2)
    ignored = seg_loss(
        logits, torch.tensor([[[0, 255]]]), class_weights=[0.5, 2.0, 7.0], dice_weight=0.0
    )
    assert ignored["loss_ce"].item() == pytest.approx(0.5 * LOG3 / 2)  # still divided by 2 pixels


def test_seg_dice_by_hand():
    # two classes, two pixels; foreground probabilities a, b; label [1, 0]
    z = torch.tensor([0.3, -1.2])
    logits = torch.stack([torch.zeros(2), z]).reshape(1, 2, 1, 2)
    a, b = torch.sigmoid(z).tolist()
    eps = 1e-3
    out = seg_loss(logits, torch.tensor([[[1, 0]]]), class_weights=[1.0, 1.0], ce_weight=0.0)
    assert out["loss_dice"].item() == pytest.approx(
        1 - (2 * a + eps) / (a * a + b * b + 1 + eps), rel=1e-6
    )
    masked = seg_loss(logits, torch.tensor([[[1, 255]]]), class_weights=[1.0, 1.0], ce_weight=0.0)
    assert masked["loss_dice"].item() == pytest.approx(
        1 - (2 * a + eps) / (a * a + 1 + eps), rel=1e-6
    )
    # a second sample without foreground contributes 0 but counts in the batch mean
    batch = torch.cat([logits, logits])
    labels = torch.tensor([[[1, 0]], [[0, 0]]])
    both = seg_loss(batch, labels, class_weights=[1.0, 1.0], ce_weight=0.0)
    assert both["loss_dice"].item() == pytest.approx(out["loss_dice"].item() / 2, rel=1e-6)
    assert both["loss"].item() == pytest.approx(both["loss_dice"].item())


def test_seg_dice_averages_present_classes_only():
    logits = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([[[0, 1, 1], [1, 3, 3], [0, 0, 255]]])
    p = logits.softmax(1)[0]
    valid = target[0] != 255
    dice = []
    for c in (1, 3):  # class 2 is absent and must not enter the mean
        pc, gc = p[c][valid], (target[0][valid] == c).float()
        dice.append((2 * (pc * gc).sum() + 1e-3) / (pc.square().sum() + gc.square().sum() + 1e-3))
    out = seg_loss(logits, target, class_weights=[1.0] * 4, ce_weight=0.0)
    assert out["loss_dice"].item() == pytest.approx(1 - sum(dice).item() / 2, rel=1e-6)


def test_seg_logits_are_resized_to_the_label():
    logits = torch.zeros(1, 2, 2, 2)
    logits[:, 1] = 5.0
    out = seg_loss(
        logits, torch.ones(1, 4, 4, dtype=torch.long), class_weights=[1.0, 1.0], dice_weight=0.0
    )
    assert out["loss_ce"].item() == pytest.approx(-math.log(1 / (1 + math.exp(-5))), rel=1e-6)


# --------------------------------------------------------------------------- pose
def test_heatmap_mse_is_weighted_mean_over_all_elements():
    pred = torch.ones(1, 2, 2, 2)
    target = torch.zeros(1, 2, 2, 2)
    out = heatmap_mse_loss(pred, target, torch.tensor([[1.0, 0.0]]))
    assert out["loss"].item() == pytest.approx(10 * 4 / 8)


def test_udp_heatmap_peak_and_shape():
    # input 9x9 -> heatmap 5x5: factor (9-1)/(5-1) = 2; keypoint (4, 6) -> heatmap (2, 3)
    hm, w = udp_heatmaps(
        np.array([[4.0, 6.0]]), np.array([1]), input_size=(9, 9), heatmap_size=(5, 5), sigma=1.0
    )
    assert hm.shape == (1, 5, 5) and w.tolist() == [1.0]
    assert hm[0, 3, 2] == 1.0 and hm[0].argmax() == 3 * 5 + 2
    assert hm[0, 3, 3] == pytest.approx(math.exp(-0.5))
    assert hm[0, 1, 1] == pytest.approx(math.exp(-(1 + 4) / 2))


def test_udp_heatmap_subpixel_window_and_visibility():
    sigma = 1.0  # window radius 3
    kp = np.array([[2.3, 10.0], [0.0, 0.0], [-5.0, 3.0], [-2.6, 3.0]])
    hm, w = udp_heatmaps(
        kp, np.array([1, 0, 1, 1]), input_size=(20, 20), heatmap_size=(20, 20), sigma=sigma
    )
    # centre mu = floor(2.3 + 0.5) = 2; values sampled at the exact offset
    assert hm[0, 10, 2] == pytest.approx(math.exp(-(0.3**2) / 2), rel=1e-6)
    assert hm[0, 10, 5] == pytest.approx(math.exp(-(2.7**2) / 2), rel=1e-6)  # |5 - 2| = 3 = radius
    assert hm[0, 10, 6] == 0.0 and hm[0, 6, 2] == 0.0
    assert hm[0, 7, 2] == pytest.approx(math.exp(-(0.09 + 9) / 2), rel=1e-6)
    assert w[1] == 0 and not hm[1].any()  # invisible
    assert w[2] == 0 and not hm[2].any()  # window [-8, -2] entirely outside
    # x = -2.6 -> mu = floor(-2.1) = -3, window [-6, 0] touches column 0
    assert w[3] == 1 and hm[3, 3, 0] == pytest.approx(math.exp(-(2.6**2) / 2), rel=1e-6)


# --------------------------------------------------------------------------- normals / albedo
def test_normal_loss_by_hand():
    pred = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 0.0]]).reshape(
        1, 3, 1, 2
    )  # pixels (2,0,0), (0,1,0)
    target = torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]).reshape(1, 3, 1, 2)
    mask = torch.ones(1, 1, 2, dtype=torch.bool)
    out = normal_loss(pred, target, mask)
    assert out["loss_cosine"].item() == pytest.approx(10 * (0 + 1) / 2)
    assert out["loss_l1"].item() == pytest.approx(1 * (1 + 2) / 2)
    assert out["loss_grad"].item() == pytest.approx(
        10 * ((-2) ** 2 + 1**2)
    )  # one x pair, no y pair
    assert out["loss"].item() == pytest.approx(5 + 1.5 + 50)
    # an invalid pixel removes itself and every pair it belongs to, even when it holds NaN
    pred[0, :, 0, 1] = float("nan")
    half = normal_loss(pred, target, torch.tensor([[[True, False]]]))
    assert (
        half["loss_cosine"].item() == 0
        and half["loss_l1"].item() == pytest.approx(1)
        and half["loss_grad"].item() == 0
    )


def test_normal_loss_non_finite_terms_become_zero():
    pred = torch.full((1, 3, 2, 2), float("inf"))
    out = normal_loss(pred, torch.zeros(1, 3, 2, 2), torch.ones(1, 2, 2, dtype=torch.bool))
    assert out["loss_l1"].item() == 0.0 and torch.isfinite(out["loss"])


def test_albedo_loss_by_hand():
    target = torch.tensor([[0.2, 0.4], [0.2, 0.4], [0.2, 0.4]]).reshape(1, 3, 1, 2)
    pred = target.clone()
    pred[0, 0, 0, 1] = 1.4  # red of pixel 2 off by 1.0; clamped to 1.0 for chromaticity
    out = albedo_loss(pred, target, torch.ones(1, 1, 2, dtype=torch.bool))
    assert out["loss_l1"].item() == pytest.approx(2.0 * 1.0 / 2)
    assert out["loss_grad"].item() == pytest.approx(2.0 * 0.5 * 1.0**2)  # one x pair, red channel
    chroma_pred = torch.tensor([1.0, 0.4, 0.4]) / (1.8 + 1e-6)
    chroma_gt = torch.full((3,), 0.4 / (1.2 + 1e-6))
    assert out["loss_chroma"].item() == pytest.approx(
        (chroma_pred - chroma_gt).abs().sum().item() / 2, rel=1e-5
    )


# --------------------------------------------------------------------------- pointmap
def _pointmap_case():
    """A tilted plane seen by K (f = 40, c = (7.5, 5.5)) on a 12x16 grid, canonical f_c = 80."""
    h, w = 12, 16
    k = torch.tensor([[40.0, 0, 7.5], [0, 40.0, 5.5], [0, 0, 1]])
    v, u = torch.meshgrid(
        torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"
    )
    z = 2.0 + 0.05 * u + 0.02 * v
    s = 80.0 / 40.0
    points = torch.stack([(u - 7.5) * z / 40.0, (v - 5.5) * z / 40.0, z]) * s  # canonical
    mask = torch.ones(1, h, w, dtype=torch.bool)
    mask[0, 0, :3] = False
    mean_depth = points[2][mask[0]].mean()
    return points[None], mask, torch.tensor([s]), k[None], mean_depth.reshape(1)


def test_pointmap_loss_is_zero_for_a_perfect_prediction():
    target, mask, s, k, d = _pointmap_case()
    out = pointmap_loss(
        target.clone(), s.reshape(1, 1), target, mask, scale=s, intrinsics=k, mean_depth=d
    )
    for name, value in out.items():
        assert value.item() == pytest.approx(0.0, abs=2e-5), name


def test_pointmap_loss_terms_by_hand():
    target, mask, s, k, d = _pointmap_case()
    shifted = target + torch.tensor([0.1, 0.0, 0.0]).reshape(1, 3, 1, 1)
    out = pointmap_loss(
        shifted, s.reshape(1, 1) + 0.25, target, mask, scale=s, intrinsics=k, mean_depth=d
    )
    assert out["loss_l1"].item() == pytest.approx(2.0 * 0.1 / d.item(), rel=1e-5)
    assert out["loss_multiscale"].item() == pytest.approx(0.1 / d.item(), rel=1e-5)
    assert out["loss_shift_invariant"].item() == pytest.approx(0.0, abs=1e-6)  # a constant shift
    assert out["loss_intrinsics"].item() == pytest.approx(0.1, rel=1e-4)  # X off by 0.1, Y exact
    assert out["loss_silog"].item() == pytest.approx(0.0, abs=1e-6)  # Z untouched
    assert out["loss_normal"].item() == pytest.approx(0.0, abs=1e-5)  # translation keeps normals
    assert out["loss_scale"].item() == pytest.approx(4.0 * 0.25)

    scaled = target * 1.5  # same normals and X/Z, Y/Z; depth ratio 1.5 everywhere
    out = pointmap_loss(scaled, s.reshape(1, 1), target, mask, scale=s, intrinsics=k, mean_depth=d)
    assert out["loss_silog"].item() == pytest.approx(abs(math.log(1.5)) / math.sqrt(2), rel=1e-4)
    assert out["loss_normal"].item() == pytest.approx(0.0, abs=1e-5)
    assert out["loss_intrinsics"].item() == pytest.approx(0.0, abs=1e-5)

    far = target * 100  # weighted L1-type terms saturate at the clamp
    out = pointmap_loss(far, s.reshape(1, 1), target, mask, scale=s, intrinsics=k, mean_depth=d)
    assert out["loss_l1"].item() == 4.0 and out["loss_multiscale"].item() == 4.0
    assert out["loss_shift_invariant"].item() == 4.0


def test_pointmap_normal_term_detects_a_wrong_orientation():
    target, mask, s, k, d = _pointmap_case()
    flipped_tilt = target.clone()
    flipped_tilt[:, 2] = 2 * target[:, 2].mean() - target[:, 2]  # mirror the plane's slope
    out = pointmap_loss(
        flipped_tilt, s.reshape(1, 1), target, mask, scale=s, intrinsics=k, mean_depth=d
    )
    assert out["loss_normal"].item() > 0.01


def test_build_loss_dispatches_with_config_weights():
    cfg = resolve("normal/tiny", ["loss.cosine_weight=1.0"])
    fn = build_loss("normal", cfg.loss)
    pred = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 0.0]]).reshape(1, 3, 1, 2)
    target = torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]).reshape(1, 3, 1, 2)
    batch = {"normal": target, "mask": torch.ones(1, 1, 2, dtype=torch.bool)}
    assert fn(pred, batch)["loss_cosine"].item() == pytest.approx(0.5)
    seg = build_loss("seg", resolve("seg/tiny").loss)
    out = seg(torch.zeros(1, 29, 2, 2), {"label": torch.zeros(1, 2, 2, dtype=torch.long)})
    assert out["loss_ce"].item() == pytest.approx(0.1 * math.log(29), rel=1e-6)
    target, mask, s, k, d = _pointmap_case()
    pm = build_loss("pointmap", PointmapLoss())
    batch = {"pointmap": target, "mask": mask, "scale": s, "intrinsics": k, "mean_depth": d}
    assert pm((target, s.reshape(1, 1)), batch)["loss"].item() == pytest.approx(0.0, abs=1e-4)
    with pytest.raises(ValueError, match="no loss for task 'seg'"):
        build_loss("seg", PointmapLoss())
