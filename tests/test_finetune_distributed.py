"""Two processes under torchrun (gloo, CPU) train like one process with the same global batch,
with DDP and with FSDP2, and a stopped two-process run resumes bit for bit."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_torchrun
from finetune_runs import read_metrics, seg_learnable, tiny_run
from safetensors.torch import load_file

from sapiens2_cli.weights import load_model

SRC = Path(__file__).resolve().parents[1] / "src"
COMMON = [
    "train.iterations=10",
    "train.log_interval=1",
    "eval.interval=5",
    "checkpoint.interval=5",
]


def _torchrun(data: Path, run: Path, *args: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "sapiens2_cli", "finetune", "--recipe", "seg/tiny", "--data", str(data),
        "--val-data", str(data), "-o", str(run), *COMMON, "train.batch_size=1", *args,
    ]  # fmt: skip
    run_torchrun(command, env, run)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, global batch 2."""
    root = tmp_path_factory.mktemp("single")
    data = seg_learnable(root / "data")
    return data, tiny_run(root, "seg", data=data, overrides=[*COMMON, "train.batch_size=2"])


def _close_to_single(run: Path, single: Path) -> float:
    """Largest relative deviation of the logged losses from the single-process run."""
    ours, theirs = read_metrics(run), read_metrics(single)
    assert [r["step"] for r in ours] == [r["step"] for r in theirs] == list(range(1, 11))
    worst = max(
        abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in zip(ours, theirs, strict=True)
    )
    assert worst < 1e-5, worst
    for a, b in zip(read_metrics(run, "val"), read_metrics(single, "val"), strict=True):
        assert a["mIoU"] == pytest.approx(b["mIoU"], rel=1e-4)
    # weights are compared through the outputs: the biases of convolutions followed by instance
    # norm get ~0 gradients whose rounding noise AdamW turns into full-size, output-free updates
    x = torch.randn(2, 3, 64, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = load_model(run / "final.safetensors")(x)
        theirs = load_model(single / "final.safetensors")(x)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    return worst


def test_ddp_matches_one_process_and_resumes_exactly(tmp_path, reference):
    data, single = reference
    full = tmp_path / "full"
    _torchrun(data, full, "train.distributed=ddp")
    _close_to_single(full, single)

    part = tmp_path / "part"
    _torchrun(data, part, "train.distributed=ddp", "--stop-at", "7")
    assert not (part / "final.safetensors").exists()
    _torchrun(data, part, "train.distributed=ddp", "--resume")
    assert read_metrics(part) == read_metrics(full)
    assert read_metrics(part, "val") == read_metrics(full, "val")
    x, y = load_file(part / "final.safetensors"), load_file(full / "final.safetensors")
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_fsdp2_matches_one_process_and_resumes_from_shards(tmp_path, reference):
    """FSDP2 trains like one process; with checkpoint.sharded=true each rank writes its own
    shards and a stopped run resumes from them exactly as from a full checkpoint."""
    data, single = reference
    run = tmp_path / "fsdp"
    _torchrun(data, run, "train.distributed=fsdp")
    _close_to_single(run, single)

    part = tmp_path / "part"
    _torchrun(data, part, "train.distributed=fsdp", "checkpoint.sharded=true", "--stop-at", "7")
    (folder,) = [p for p in (part / "checkpoints").iterdir() if p.name == "step_00000007"]
    shards = sorted(p.name for p in folder.iterdir() if p.suffix == ".distcp")
    assert shards == ["__0_0.distcp", "__1_0.distcp"]  # one file per rank
    _torchrun(data, part, "train.distributed=fsdp", "checkpoint.sharded=true", "--resume")
    assert read_metrics(part) == read_metrics(run)
    assert read_metrics(part, "val") == read_metrics(run, "val")
    x, y = load_file(part / "final.safetensors"), load_file(run / "final.safetensors")
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_sigterm_on_one_rank_stops_both_at_the_same_step(tmp_path, reference):
    """Rank 1 alone gets SIGTERM during step 3: both ranks stop after step 3 with one checkpoint
    and exit 143; --resume finishes the run like an uninterrupted one."""
    import subprocess

    data, single = reference
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", SAPIENS2_TEST_SIGTERM_STEP="3")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        str(Path(__file__).with_name("sigterm_one_rank.py")), "finetune", "--recipe", "seg/tiny", "--data", str(data),
        "--val-data", str(data), "-o", str(run), *COMMON, "train.batch_size=1", "train.distributed=ddp",
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode != 0
    assert "stopped by SIGTERM after step 3 (checkpoint written)" in done.stderr, done.stderr[-4000:]
    assert "exitcode: 143" in done.stderr or "exitcode  : 143" in done.stderr, done.stderr[-4000:]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000003.pt"]
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]
    _torchrun(data, run, "train.distributed=ddp", "--resume")
    _close_to_single(run, single)
