"""The pieces fit together the way a training loop uses them, for every task.

tiny recipe + folder -> build_dataset -> DataLoader(InfiniteSampler, collate) -> a stand-in
model output of the head's shape -> build_loss -> backward; validation batches -> the task's
metric. No model code: outputs are free tensors with gradients.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from train_folders import coco_folder, dense_folder, keypoints308, person_label, seg_folder

from sapiens2_cli.train.config import resolve
from sapiens2_cli.train.datasets import build_dataset, collate
from sapiens2_cli.train.losses import build_loss
from sapiens2_cli.train.metrics import AlbedoMetric, NormalMetric, PointmapMetric, SegMetric
from sapiens2_cli.train.sampler import InfiniteSampler

H, W = 64, 48


def _folder(task: str, root):
    rng = np.random.default_rng(0)
    if task == "seg":
        return seg_folder(root, [person_label(), person_label(80, 60)])
    if task == "pose":
        return coco_folder(root, [keypoints308(rng)])
    mask = np.zeros((72, 54), bool)
    mask[6:66, 8:46] = True
    if task == "normal":
        n = rng.normal(size=(72, 54, 3)).astype(np.float32)
        return dense_folder(root, task, n / np.linalg.norm(n, axis=-1, keepdims=True), mask=mask)
    if task == "albedo":
        return dense_folder(
            root, task, rng.uniform(0, 1, (72, 54, 3)).astype(np.float32), mask=mask
        )
    k = {"K": [[60.0, 0, 26.5], [0, 60.0, 35.5], [0, 0, 1]]}
    return dense_folder(
        root, task, rng.uniform(1.5, 3.0, (72, 54)).astype(np.float32), mask=mask, k=k
    )


def _output(task: str, batch: dict) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    b = batch["image"].shape[0]
    gen = torch.Generator().manual_seed(0)
    shape = {"seg": (b, 29, H, W), "pose": (b, 308, H // 4, W // 4)}.get(task, (b, 3, H, W))
    out = torch.randn(shape, generator=gen).requires_grad_()
    if task == "pointmap":
        return out, torch.rand(b, 1, generator=gen).requires_grad_()
    return out


@pytest.mark.parametrize("task", ["seg", "pose", "normal", "pointmap", "albedo"])
def test_training_batch_to_loss_and_validation_to_metric(tmp_path, task):
    root = _folder(task, tmp_path / task)
    cfg = resolve(f"{task}/tiny", [f"data.train={root}", f"data.val={root}"])
    train = build_dataset(cfg, split="train")
    sampler = InfiniteSampler(len(train), seed=cfg.train.seed)
    loader = torch.utils.data.DataLoader(
        train, batch_size=cfg.train.batch_size, sampler=sampler, collate_fn=collate, num_workers=0
    )
    batch = next(iter(loader))
    assert batch["image"].shape == (cfg.train.batch_size, 3, H, W)
    output = _output(task, batch)
    terms = build_loss(task, cfg.loss)(output, batch)
    assert torch.isfinite(terms["loss"]) and terms["loss"] > 0
    terms["loss"].backward()
    grads = [output[0].grad, output[1].grad] if task == "pointmap" else [output.grad]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)

    val = build_dataset(cfg, split="val")
    sample = collate([val[0]])
    if task == "pose":
        metric = val.parts[0][0].metric()
        gt = json.loads((root / "annotations.json").read_text())["annotations"][0]["keypoints"]
        metric.add_prediction(sample["image_id"][0], np.reshape(gt, (-1, 3))[:, :2], np.ones(308))
        assert metric.compute()["AP"] == pytest.approx(1.0)
        return
    pred = _output(task, sample)
    if task == "seg":
        metric = SegMetric(29)
        metric.update(pred.detach(), sample["label"])
        assert 0 <= metric.compute()["mIoU"] <= 100
    elif task == "normal":
        metric = NormalMetric()
        metric.update(pred.detach(), sample["normal"], sample["mask"], pad=sample["pad"])
        assert 0 < metric.compute()["mean"] < 180
    elif task == "albedo":
        metric = AlbedoMetric()
        metric.update(pred.detach(), sample["albedo"], sample["mask"], pad=sample["pad"])
        assert metric.compute()["mae"] > 0
    else:
        metric = PointmapMetric()
        metric.update(pred[0].detach(), sample["pointmap"], sample["mask"])
        assert metric.compute()["l2_mean"] > 0
