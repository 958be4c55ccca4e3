"""The validation pass maps predictions back to the ground truth's frame: a model that predicts
the ground truth scores perfectly (pose through the UDP+DARK decoder and the crop geometry of
two folders; normals through the resize + padding of a non-4:3 image)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from train_folders import coco_folder, dense_folder, keypoints308

from sapiens2_cli.distributed import DistEnv
from sapiens2_cli.train.config import resolve
from sapiens2_cli.train.datasets import build_dataset
from sapiens2_cli.train.evaluation import Evaluator
from sapiens2_cli.train.heatmaps import udp_heatmaps


class Replay(nn.Module):
    """Returns the queued outputs in order, whatever the input (one sample per call)."""

    def __init__(self, outputs: list[torch.Tensor]) -> None:
        super().__init__()
        self.outputs = list(outputs)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.outputs.pop(0)


def test_pose_evaluator_gives_ap_1_for_heatmaps_of_the_ground_truth(tmp_path):
    rng = np.random.default_rng(0)
    folders = [coco_folder(tmp_path / n, [keypoints308(rng), keypoints308(rng)]) for n in "ab"]
    h, w = 256, 192
    cfg = resolve(
        "pose/tiny", [f"data.val=[{folders[0]}, {folders[1]}]", f"model.input_size=[{h}, {w}]"]
    )
    val = build_dataset(cfg, split="val")
    assert len(val) == 4
    outputs = []
    for i in range(len(val)):
        sample = val[i]
        part = 0 if i < 2 else 1
        ann = json.loads((folders[part] / "annotations.json").read_text())["annotations"][i % 2]
        kp = np.reshape(ann["keypoints"], (-1, 3))
        c, s = sample["center"].numpy().astype(np.float64), sample["box_size"].numpy()
        # crop pixels the decoder maps back onto the ground truth (x = X / W * s + c - s / 2),
        # then the heatmap position it reads them from (x * W / (w - 1))
        crop = (kp[:, :2] - c + s / 2) * np.array([w, h]) / s
        hm = crop * np.array([w // 4 - 1, h // 4 - 1]) / np.array([w, h])
        heat, _ = udp_heatmaps(
            hm * np.array([w - 1, h - 1]) / np.array([w // 4 - 1, h // 4 - 1]),
            (kp[:, 2] > 0).astype(np.float32),
            input_size=(w, h),
            heatmap_size=(w // 4, h // 4),
            sigma=2.0,
        )
        # invisible keypoints: weak noise (an all-zero map decodes to NaN, which OKS-NMS treats
        # as a duplicate), as a trained model would give
        heat = heat + 1e-3 * rng.random(heat.shape, dtype=np.float32)
        outputs.append(torch.from_numpy(heat)[None])
    metrics = Evaluator("pose", val, DistEnv())(Replay(outputs))
    assert metrics["AP"] == pytest.approx(1.0)
    assert metrics["AR"] == pytest.approx(1.0)
    assert metrics["body/AP"] == pytest.approx(1.0)


def test_normal_evaluator_removes_the_padding_before_comparing(tmp_path):
    # 60 x 60 source -> 48 x 48 inside the 64 x 48 input, 8 rows of padding above and below
    xs = np.linspace(-0.8, 0.8, 60, dtype=np.float32)
    n = np.stack(np.broadcast_arrays(xs[None, :], np.zeros((60, 1), np.float32), -1.0), -1)
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    root = dense_folder(tmp_path / "n", "normal", n.astype(np.float32), ext=".npy")
    cfg = resolve("normal/tiny", [f"data.val={root}"])
    val = build_dataset(cfg, split="val")
    sample = val[0]
    assert sample["pad"].tolist() == [0, 0, 8, 8]
    inside = torch.nn.functional.interpolate(
        torch.from_numpy(n).permute(2, 0, 1)[None], size=(48, 48), mode="bilinear"
    )
    pred = torch.zeros(1, 3, 64, 48)
    pred[:, 2] = 1.0  # padding rows: pointing away, 180 degrees off if they leaked in
    pred[:, :, 8:56] = inside
    metrics = Evaluator("normal", val, DistEnv())(Replay([pred]))
    assert metrics["mean"] < 0.5
    assert metrics["pct_within_5"] == 100.0
