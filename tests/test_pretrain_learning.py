"""End-to-end: ``sapiens2 pretrain --recipe tiny`` writes its run folder and learns (loss falls,
teacher features beat the random initialisation), and its weights are a released-layout
pretrain checkpoint."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest
import torch
from pretrain_runs import last_checkpoint, pretrain, read_metrics
from pretrain_synthetic import make_images, single_thread, write_folder  # noqa: F401 - autouse fixture

from sapiens2_cli.models.backbone import Sapiens2Backbone
from sapiens2_cli.pretrain.augment import to_tensor
from sapiens2_cli.pretrain.model import PretrainModel
from sapiens2_cli.pretrain.run import resolve_pretrain_config
from sapiens2_cli.train.config import resolve, to_yaml
from sapiens2_cli.train.model_setup import run_arch
from sapiens2_cli.weights import load_model, read_header


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> dict:
    """The packaged tiny recipe (200 steps) on 400 synthetic images; its outputs and timing."""
    root = tmp_path_factory.mktemp("pretrain")
    images, _ = make_images(100, seed=0)
    write_folder(root / "data", images)
    start = time.perf_counter()
    pretrain(root / "data", root / "run")
    seconds = time.perf_counter() - start
    cfg = resolve_pretrain_config("tiny", data=root / "data")
    return {"cfg": cfg, "out": root / "run", "rows": read_metrics(root / "run"), "seconds": seconds}


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


def test_run_folder_layout(tiny_run):
    out = tiny_run["out"]
    assert {p.name for p in out.iterdir()} == {
        "config.yaml",
        "metrics.jsonl",
        "train.log",
        "checkpoints",
        "final.safetensors",
    }
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000200.pt"]
    saved = resolve(out / "config.yaml")  # the resolved configuration, loadable as a recipe
    assert to_yaml(saved) == (out / "config.yaml").read_text()
    assert saved.output_dir == str(out) and saved.loss == tiny_run["cfg"].loss
    assert "wrote" in (out / "train.log").read_text()


def test_metrics_rows_and_loss_decreases(tiny_run):
    rows = tiny_run["rows"]
    assert [r["step"] for r in rows] == list(range(1, 201))
    assert {"loss", "mae", "dino", "koleo", "lr", "teacher_temp", "momentum", "grad_norm"} <= rows[0].keys()
    assert rows[0]["teacher_temp"] == 0.065 and rows[0]["momentum"] == 0.9
    first = np.mean([r["loss"] for r in rows[:10]])
    last = np.mean([r["loss"] for r in rows[-20:]])
    print(f"total loss: first 10 steps {first:.3f}, last 20 steps {last:.3f}; run {tiny_run['seconds']:.1f} s")
    assert last < first - 0.05, (first, last)
    assert np.mean([r["mae"] for r in rows[-20:]]) < 0.85 * np.mean([r["mae"] for r in rows[:10]])


def test_final_weights_are_the_teacher_in_the_release_layout(tiny_run):
    path = tiny_run["out"] / "final.safetensors"
    arch = run_arch(tiny_run["cfg"].model)
    header = read_header(path)
    with torch.device("meta"):
        expected = Sapiens2Backbone(arch).state_dict()
    assert {k: tuple(s) for k, s in header.shapes.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    assert header.metadata["sapiens2.task"] == "pretrain"
    assert header.metadata["sapiens2.pretrain_steps"] == "200"
    model = load_model(path, task="pretrain")
    assert model.task == "pretrain" and model.backbone.arch == arch
    teacher = last_checkpoint(tiny_run["out"])["model"]
    for key, tensor in model.backbone.state_dict().items():
        assert torch.equal(tensor, teacher[f"teacher.backbone.{key}"]), key


def test_teacher_features_beat_random_init(tiny_run):
    cfg = tiny_run["cfg"]
    size = cfg.model.input_size[0]
    torch.manual_seed(cfg.train.seed)  # the same initialisation the run started from
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
