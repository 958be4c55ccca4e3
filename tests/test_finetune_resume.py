"""A run stopped and resumed equals an uninterrupted run, bit for bit (CPU), and a run folder is
never overwritten or resumed with another configuration."""

from __future__ import annotations

import torch
from click.testing import CliRunner
from finetune_runs import read_metrics, seg_learnable, tiny_run
from safetensors.torch import load_file

from sapiens2_cli.cli import main

# checkpoint at 14 falls between log lines (every 3 steps): the running loss sums must resume
OVERRIDES = [
    "train.iterations=30",
    "train.log_interval=3",
    "eval.interval=10",
    "checkpoint.interval=10",
    "checkpoint.keep=2",
]


def _cli(*args: str) -> object:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return CliRunner().invoke(main, list(args))
    finally:
        torch.set_num_threads(threads)


def _same_tensors(a, b) -> None:
    x, y = load_file(a), load_file(b)
    assert x.keys() == y.keys()
    for key in x:
        assert torch.equal(x[key], y[key]), key


def test_stopped_and_resumed_run_equals_uninterrupted_run(tmp_path):
    data = seg_learnable(tmp_path / "data")
    full = tiny_run(tmp_path / "full", "seg", overrides=OVERRIDES, data=data)
    part = tiny_run(tmp_path / "part", "seg", overrides=OVERRIDES, data=data, stop_at=14)
    assert not (part / "final.safetensors").exists()
    assert sorted(p.name for p in (part / "checkpoints").iterdir()) == [
        "step_00000010.pt",
        "step_00000014.pt",
    ]
    # the command line takes the recipe from RUN/config.yaml when resuming
    result = _cli("finetune", "-o", str(part), "--resume")
    assert result.exit_code == 0, result.output

    assert read_metrics(part) == read_metrics(full)  # every logged loss term, lr and grad norm
    assert [r["step"] for r in read_metrics(full)] == [3, 6, 9, 12, 15, 18, 21, 24, 27, 30]
    assert read_metrics(part, "val") == read_metrics(full, "val")
    _same_tensors(part / "final.safetensors", full / "final.safetensors")
    _same_tensors(part / "best.safetensors", full / "best.safetensors")
    # keep=2: only the newest two checkpoints survive
    assert sorted(p.name for p in (part / "checkpoints").iterdir()) == [
        "step_00000020.pt",
        "step_00000030.pt",
    ]
    # resuming a finished run trains nothing and keeps the history
    before = (part / "metrics.jsonl").read_text()
    assert _cli("finetune", "-o", str(part), "--resume").exit_code == 0
    assert (part / "metrics.jsonl").read_text() == before


def test_run_folder_is_protected(tmp_path):
    data = seg_learnable(tmp_path / "data")
    run = tiny_run(
        tmp_path, "seg", overrides=["train.iterations=6", "schedule.warmup_iters=2"], data=data
    )
    common = ["finetune", "--recipe", "seg/tiny", "--data", str(data), "-o", str(run)]
    again = _cli(*common, "train.iterations=6", "schedule.warmup_iters=2")
    assert again.exit_code == 2
    assert "already holds a run; pass --resume" in again.output
    changed = _cli(*common, "--resume", "train.iterations=8", "schedule.warmup_iters=2")
    assert changed.exit_code == 2
    assert "train.iterations: 6 -> 8" in changed.output


def test_sigterm_checkpoints_the_step_in_progress_and_resumes_exactly(tmp_path, monkeypatch):
    """A scheduler's SIGTERM during step 14 ends the run after that step with a checkpoint and
    exit code 143; --resume then finishes it exactly as an uninterrupted run."""
    import os
    import signal

    from sapiens2_cli.train.loop import Trainer

    data = seg_learnable(tmp_path / "data")
    full = tiny_run(tmp_path / "full", "seg", overrides=OVERRIDES, data=data)
    step = Trainer._optimizer_step

    def step_and_signal(self, stream):
        step(self, stream)
        if self.step == 13:  # the step being taken is the 14th
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Trainer, "_optimizer_step", step_and_signal)
    part = tmp_path / "part"
    args = ["finetune", "--recipe", "seg/tiny", "--data", str(data), "--val-data", str(data), "-o", str(part)]
    stopped = _cli(*args, *OVERRIDES)
    assert stopped.exit_code == 128 + signal.SIGTERM, stopped.output
    assert "stopped by SIGTERM after step 14 (checkpoint written); continue with --resume" in stopped.output
    assert sorted(p.name for p in (part / "checkpoints").iterdir()) == ["step_00000010.pt", "step_00000014.pt"]
    assert not (part / "final.safetensors").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back

    monkeypatch.setattr(Trainer, "_optimizer_step", step)
    resumed = _cli("finetune", "-o", str(part), "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert read_metrics(part) == read_metrics(full)
    _same_tensors(part / "final.safetensors", full / "final.safetensors")


def test_sharded_checkpoints_resume_exactly(tmp_path):
    """checkpoint.sharded=true: one folder of shards per checkpoint (meta.pt beside them), kept
    and pruned like files; a stopped run resumes from it bit for bit."""
    data = seg_learnable(tmp_path / "data")
    sharded = [*OVERRIDES, "checkpoint.sharded=true"]
    full = tiny_run(tmp_path / "full", "seg", overrides=OVERRIDES, data=data)
    part = tiny_run(tmp_path / "part", "seg", overrides=sharded, data=data, stop_at=14)
    folders = sorted((part / "checkpoints").iterdir())
    assert [p.name for p in folders] == ["step_00000010", "step_00000014"]
    assert all((p / "meta.pt").is_file() and (p / ".metadata").is_file() for p in folders)
    assert _cli("finetune", "-o", str(part), "--resume").exit_code == 0
    assert read_metrics(part) == read_metrics(full)
    _same_tensors(part / "final.safetensors", full / "final.safetensors")
    assert sorted(p.name for p in (part / "checkpoints").iterdir()) == ["step_00000020", "step_00000030"]
