"""Pretraining runs for the tests: the real command line, in this process or under torchrun."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from click.testing import CliRunner, Result

from conftest import run_torchrun
from sapiens2_cli.cli import main

SRC = Path(__file__).resolve().parents[1] / "src"


def cli(*args: str) -> Result:
    """``sapiens2 <args>`` in this process, on one intra-op thread (pretrain_synthetic)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return CliRunner().invoke(main, [str(a) for a in args])
    finally:
        torch.set_num_threads(threads)


def pretrain(data: Path, run: Path, *args: str) -> Result:
    """``sapiens2 pretrain --recipe tiny --data DATA -o RUN ARGS`` that must succeed."""
    result = cli("pretrain", "--recipe", "tiny", "--data", data, "-o", run, *args)
    assert result.exit_code == 0, result.output
    return result


def torchrun(data: Path, run: Path, *args: str, nproc: int = 2) -> None:
    """The same command under ``torchrun --nproc-per-node nproc`` (gloo on CPU)."""
    env = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
        "-m", "sapiens2_cli", "pretrain", "--recipe", "tiny", "--data", str(data), "-o", str(run), *args,
    ]  # fmt: skip
    run_torchrun(command, env, run)


def read_metrics(run: Path) -> list[dict]:
    """The training lines of ``RUN/metrics.jsonl`` without the wall-clock field."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in lines if r["split"] == "train"]


def last_checkpoint(run: Path) -> dict:
    """The newest ``RUN/checkpoints/step_*.pt``, loaded as the loop would (weights only)."""
    path = max((run / "checkpoints").glob("step_*.pt"))
    return torch.load(path, map_location="cpu", weights_only=True)
