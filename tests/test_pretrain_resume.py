"""``sapiens2 pretrain --stop-at`` then ``--resume`` equals an uninterrupted run, bit for bit
(losses, student, teacher, DINO centre, optimizer, data position), and a run folder is never
overwritten or resumed with another configuration."""

from __future__ import annotations

import math

import pytest
import torch
from pretrain_runs import cli, last_checkpoint, pretrain, read_metrics
from pretrain_synthetic import make_images, single_thread, write_folder  # noqa: F401 - autouse fixture
from safetensors.torch import load_file

# 8 steps of 4 samples from 48 images in shuffle windows of 5: the stop at step 3 falls inside
# a window; log lines every 2 steps, so the resumed run must also restore the running sums
SHORT = [
    "train.iterations=8",
    "schedule.warmup_iters=2",
    "train.batch_size=4",
    "data.shuffle_window=5",
    "train.log_interval=2",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain_data")
    images, _ = make_images(12, seed=3, size=72)
    write_folder(root, images, per_dir=20)
    return root


def _same_state(a, b, where: str = "") -> None:
    """Nested state dicts equal exactly (a tuple read back from a checkpoint is a list)."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _same_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("workers", [0, 2])
def test_stopped_and_resumed_run_equals_uninterrupted_run(data_dir, tmp_path, workers):
    args = [*SHORT, f"data.num_workers={workers}"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    pretrain(data_dir, straight, *args)
    pretrain(data_dir, split, *args, "--stop-at", "3")
    assert not (split / "final.safetensors").exists()
    assert [r["step"] for r in read_metrics(split)] == [2]
    # the command line takes the recipe from RUN/config.yaml when resuming
    result = cli("pretrain", "-o", split, "--resume")
    assert result.exit_code == 0, result.output

    assert read_metrics(split) == read_metrics(straight)  # every loss term, lr, momentum, temp
    assert [r["step"] for r in read_metrics(straight)] == [2, 4, 6, 8]
    a, b = load_file(straight / "final.safetensors"), load_file(split / "final.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = last_checkpoint(straight), last_checkpoint(split)
    _same_state(ca["model"], cb["model"])  # student, decoder, teacher, dino_loss.center
    _same_state(ca["optimizer"], cb["optimizer"])
    assert ca["extra"]["data"] == cb["extra"]["data"]  # the stream position
    assert ca["model"]["dino_loss.center"].abs().sum() > 0


def test_run_folder_is_protected(data_dir, tmp_path):
    run = tmp_path / "run"
    pretrain(data_dir, run, *SHORT, "--stop-at", "2")
    again = cli("pretrain", "--recipe", "tiny", "--data", data_dir, "-o", run, *SHORT)
    assert again.exit_code == 2 and "already holds a run" in again.output
    changed = cli("pretrain", "--recipe", "tiny", "--data", data_dir, "-o", run, *SHORT, "optim.lr=0.01", "--resume")
    assert changed.exit_code == 2 and "optim.lr: 0.001 -> 0.01" in changed.output
    assert [r["step"] for r in read_metrics(run)] == [2]  # the refused calls trained nothing


def test_bf16_autocast_steps_run(data_dir, tmp_path):
    pretrain(data_dir, tmp_path / "bf16", *SHORT, "train.precision=bf16", "--stop-at", "2")
    rows = read_metrics(tmp_path / "bf16")
    assert len(rows) == 1 and all(math.isfinite(v) for v in rows[0].values() if isinstance(v, float))


def test_sharded_checkpoint_resumes_exactly(data_dir, tmp_path):
    """checkpoint.sharded=true holds student, teacher, DINO centre and AdamW in shards; the
    resumed run ends where an uninterrupted one does."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    pretrain(data_dir, straight, *SHORT)
    pretrain(data_dir, split, *SHORT, "checkpoint.sharded=true", "--stop-at", "3")
    assert [p.name for p in (split / "checkpoints").iterdir()] == ["step_00000003"]
    assert cli("pretrain", "-o", split, "--resume").exit_code == 0
    assert read_metrics(split) == read_metrics(straight)
    a, b = load_file(straight / "final.safetensors"), load_file(split / "final.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
