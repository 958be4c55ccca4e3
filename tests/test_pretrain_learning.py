"""End-to-end: a tiny pretraining run learns (loss falls, teacher features beat random init)."""

from __future__ import annotations

import json
import time

import cv2
import numpy as np
import pytest
import torch
from pretrain_synthetic import make_images, single_thread, write_folder  # noqa: F401 - autouse fixture

from sapiens2_cli.pretrain.augment import to_tensor
from sapiens2_cli.pretrain.config import load_recipe
from sapiens2_cli.pretrain.model import PretrainModel
from sapiens2_cli.pretrain.run import train
from sapiens2_cli.weights import load_model


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> dict:
    """The packaged tiny recipe (150 steps) on 400 synthetic images; its outputs and timing."""
    root = tmp_path_factory.mktemp("pretrain")
    images, _ = make_images(100, seed=0)
    write_folder(root / "data", images)
    cfg = load_recipe("tiny")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module-scoped, so set here: see pretrain_synthetic.single_thread
    try:
        start = time.perf_counter()
        train(cfg, root / "data", root / "run")
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    rows = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    return {"cfg": cfg, "out": root / "run", "rows": rows, "seconds": seconds}


def features(backbone: torch.nn.Module, images: np.ndarray, size: int) -> np.ndarray:
    """``[N, D]`` class-token features of ``images`` resized to ``size`` px."""
    x = torch.stack([to_tensor(cv2.resize(im, (size, size), interpolation=cv2.INTER_AREA)) for im in images])
    with torch.no_grad():
        tokens, _ = backbone.eval().forward_tokens(x)
    return tokens[:, 0].double().numpy()


def ridge_accuracy(train_x, train_y, test_x, test_y, lam: float = 1.0) -> float:
    """Linear probe: ridge regression onto one-hot labels (closed form), standardised features."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-8
    a = np.c_[(train_x - mean) / std, np.ones(len(train_x))]
    b = np.c_[(test_x - mean) / std, np.ones(len(test_x))]
    w = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ np.eye(train_y.max() + 1)[train_y])
    return float(((b @ w).argmax(1) == test_y).mean())


def knn_accuracy(train_x, train_y, test_x, test_y, k: int = 10) -> float:
    """k-NN (cosine, majority vote) on features standardised with the training statistics."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-8
    a, b = (train_x - mean) / std, (test_x - mean) / std
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    nearest = np.argsort(-(b @ a.T), axis=1, kind="stable")[:, :k]
    votes = np.zeros((len(b), train_y.max() + 1))
    for row, idx in zip(votes, nearest, strict=True):
        np.add.at(row, train_y[idx], 1)
    return float((votes.argmax(1) == test_y).mean())


def test_metrics_rows_and_loss_decreases(tiny_run):
    rows = tiny_run["rows"]
    assert [r["step"] for r in rows] == list(range(1, 151))
    assert {"loss", "mae", "dino", "koleo", "lr", "teacher_temp", "momentum", "grad_norm"} <= rows[0].keys()
    first = np.mean([r["loss"] for r in rows[:10]])
    last = np.mean([r["loss"] for r in rows[-20:]])
    print(f"total loss: first 10 steps {first:.3f}, last 20 steps {last:.3f}")
    assert last < first - 0.05, (first, last)
    assert np.mean([r["mae"] for r in rows[-20:]]) < 0.85 * np.mean([r["mae"] for r in rows[:10]])
    assert (tiny_run["out"] / "config.yaml").is_file()


def test_teacher_features_beat_random_init(tiny_run):
    cfg = tiny_run["cfg"]
    size = cfg.crops.global_size[0]
    torch.manual_seed(cfg.seed)  # the same initialisation the run started from
    random_backbone = PretrainModel(cfg).teacher["backbone"]
    teacher = load_model(tiny_run["out"] / "final.safetensors").backbone
    train_x, train_y = make_images(200, seed=100)
    test_x, test_y = make_images(200, seed=200)
    acc: dict[str, dict[str, float]] = {"knn": {}, "linear": {}}
    for name, backbone in (("random", random_backbone), ("teacher", teacher)):
        a, b = features(backbone, train_x, size), features(backbone, test_x, size)
        acc["knn"][name] = knn_accuracy(a, train_y, b, test_y)
        acc["linear"][name] = ridge_accuracy(a, train_y, b, test_y)
    print(f"probe accuracy {acc}, training {tiny_run['seconds']:.1f} s")
    for probe in ("knn", "linear"):
        random_acc, teacher_acc = acc[probe]["random"], acc[probe]["teacher"]
        assert teacher_acc >= random_acc + 0.04, (probe, acc)
        assert 1 - teacher_acc <= 0.5 * (1 - random_acc), (probe, acc)  # at most half the errors
