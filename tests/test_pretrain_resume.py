"""The driver: run-folder layout, exact resume, bf16 autocast."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import yaml
from pretrain_synthetic import make_images, single_thread, write_folder  # noqa: F401 - autouse fixture
from safetensors.torch import load_file

from sapiens2_cli.pretrain.config import PretrainConfig, load_recipe
from sapiens2_cli.pretrain.run import train


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain_data")
    images, _ = make_images(12, seed=3, size=72)
    write_folder(root, images, per_dir=20)
    return root


def small_cfg(**optim) -> PretrainConfig:
    cfg = load_recipe("tiny")
    cfg.optim = dataclasses.replace(cfg.optim, iters=8, warmup_iters=2, **optim)
    cfg.data = dataclasses.replace(cfg.data, batch_size=4, shuffle_window=5)
    return cfg


def rows(path):
    return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in path.read_text().splitlines()]


def test_resume_continues_exactly(data_dir, tmp_path):
    cfg = small_cfg()
    straight = train(cfg, data_dir, tmp_path / "straight", steps=8)
    train(cfg, data_dir, tmp_path / "split", steps=3)
    resumed = train(cfg, data_dir, tmp_path / "split", steps=8, resume=True)

    assert rows(tmp_path / "split" / "metrics.jsonl") == rows(tmp_path / "straight" / "metrics.jsonl")
    assert [r["step"] for r in rows(tmp_path / "split" / "metrics.jsonl")] == list(range(1, 9))
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    fa = load_file(tmp_path / "straight" / "final.safetensors")
    fb = load_file(tmp_path / "split" / "final.safetensors")
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)


def test_run_folder_layout(data_dir, tmp_path):
    cfg = small_cfg()
    train(cfg, data_dir, tmp_path / "run", steps=2)
    out = tmp_path / "run"
    assert {p.name for p in out.iterdir()} == {"config.yaml", "metrics.jsonl", "last.pt", "final.safetensors"}
    assert PretrainConfig.from_dict(yaml.safe_load((out / "config.yaml").read_text())) == cfg
    with pytest.raises(FileNotFoundError, match="nothing to resume from"):
        train(cfg, data_dir, tmp_path / "elsewhere", steps=2, resume=True)


def test_bf16_autocast_step_runs(data_dir, tmp_path):
    train(small_cfg(precision="bf16"), data_dir, tmp_path / "bf16", steps=2)
    losses = rows(tmp_path / "bf16" / "metrics.jsonl")
    assert len(losses) == 2 and all(r["loss"] == r["loss"] for r in losses)
