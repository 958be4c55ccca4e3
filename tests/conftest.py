"""Shared test helpers: where the fixtures live, tiny models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("SAPIENS2_FIXTURES", REPO.parent / "shared" / "fixtures"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def fixture_cases(kind: str) -> list[Path]:
    """Every case folder under ``$SAPIENS2_FIXTURES/<kind>`` (sorted); none found is an error."""
    root = FIXTURES / kind
    cases = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not cases:
        raise RuntimeError(f"no fixture case found under {root} (set SAPIENS2_FIXTURES)")
    return cases


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES

SPEC = Path(os.environ.get("SAPIENS2_SPEC", FIXTURES.parent / "spec"))


def make_fake_hub_cache(cache: Path, repo_id: str, files: dict[str, Path], commit: str = "0" * 40) -> Path:
    """Lay out ``files`` as huggingface_hub's cache would after a download of ``repo_id``."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for name, src in files.items():
        (snap / name).symlink_to(Path(src).resolve())
    return snap


TINY_INPUT_SIZES = {
    "seg": (128, 96), "pose": (128, 96), "normal": (128, 96), "albedo": (128, 96), "pointmap": (144, 80),
    "pretrain": (192, 128),
}  # fmt: skip
PARITY_CASE = {"pretrain": "backbone_tokenizer"}  # the 4K-style backbone with the windowed tokenizer


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """The parity models of every predict task saved with our metadata, their input size
    included, so that ``--input-size`` can be left out: task -> file."""
    import dataclasses

    from sapiens2_cli import load_model
    from sapiens2_cli.weights import save_model

    folder = tmp_path_factory.mktemp("tiny_models")
    out = {}
    for task, size in TINY_INPUT_SIZES.items():
        model = load_model(FIXTURES / "parity" / PARITY_CASE.get(task, task) / "model.safetensors")
        model.info = dataclasses.replace(model.info, input_size=size)
        out[task] = save_model(model, folder / f"{task}.safetensors")
    return out


def run_torchrun(command: list[str], env: dict[str, str], run: Path) -> None:
    """Run a two-process torchrun job; a rank killed by SIGABRT while gloo tears down (seen
    only on a heavily loaded machine, after the training itself had gone on normally) is
    retried once: from scratch, or from its last checkpoint with ``--resume`` (exact either
    way). Any other failure, or a second abort, fails the test."""
    import shutil
    import subprocess

    for attempt in range(2):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
        aborted = "terminate called without an active exception" in done.stderr or "exitcode: -6" in done.stderr
        if done.returncode == 0 or not aborted or attempt:
            break
        if "--resume" not in command:
            shutil.rmtree(run, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-4000:]
