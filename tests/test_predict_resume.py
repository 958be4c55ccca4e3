"""A killed or stopped run leaves only complete files, and the next run completes it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest
from click.testing import CliRunner

from conftest import FIXTURES, REPO
from sapiens2_cli.cli import main
from sapiens2_cli.writers import PART_SUFFIX

DATA = Path(__file__).parent / "data"
N_IMAGES = 16


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    image = cv2.imread(str(DATA / "grace_hopper.jpg"))
    for i in range(N_IMAGES):
        cv2.imwrite(str(root / f"img{i:02d}.png"), image)
    return root


def start(folder: Path, out: Path, model: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "SAPIENS2_FIXTURES": str(FIXTURES), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "sapiens2_cli", "predict", str(folder), "-o", str(out), "--checkpoint", str(model),
           "--vis", "--workers", "1", "-b", "1"]  # fmt: skip
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_outputs(out: Path, proc: subprocess.Popen, count: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while len(list((out / "seg").glob("*.png"))) < count:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run produced no output in time"
        time.sleep(0.02)


def check_complete_files(out: Path) -> None:
    assert not [p for p in out.rglob("*") if p.name.endswith(PART_SUFFIX)]
    for path in out.rglob("*"):
        if path.suffix in (".png", ".jpg"):
            assert cv2.imread(str(path), cv2.IMREAD_UNCHANGED) is not None, path
        elif path.suffix == ".json":
            json.loads(path.read_text())


def test_killed_run_resumes_and_completes(folder, tmp_path, tiny_models):
    model = tiny_models["seg"]
    reference = tmp_path / "reference"
    assert CliRunner().invoke(main, ["predict", str(folder), "-o", str(reference), "--checkpoint", str(model),
                                     "--vis", "-q"]).exit_code == 0  # fmt: skip
    out = tmp_path / "out"
    proc = start(folder, out, model)
    wait_for_outputs(out, proc, 3)
    proc.kill()
    proc.wait()
    done = {p.name for p in (out / "seg").glob("*.png")}
    assert 3 <= len(done) < N_IMAGES
    for name in done:  # what exists is complete, and right
        assert (out / "seg" / name).read_bytes() == (reference / "seg" / name).read_bytes()
    # a write interrupted between its temporary file and the rename
    (out / "seg" / f".img15.png{PART_SUFFIX}").write_bytes(b"\x89PNG half")

    result = CliRunner().invoke(main, ["predict", str(folder), "-o", str(out), "--checkpoint", str(model), "--vis"])
    assert result.exit_code == 0, result.output
    run = json.loads((out / "run.json").read_text())
    assert run["counts"]["ok"] + run["counts"]["skipped"] == N_IMAGES and run["counts"]["failed"] == 0
    assert run["counts"]["skipped"] >= len(done) - 1  # an image killed between its two files is redone
    check_complete_files(out)
    for path in reference.rglob("*"):
        if path.suffix in (".png", ".jpg"):
            assert (out / path.relative_to(reference)).read_bytes() == path.read_bytes(), path


def test_sigterm_stops_cleanly_with_a_record(folder, tmp_path, tiny_models):
    out = tmp_path / "out"
    proc = start(folder, out, tiny_models["seg"])
    wait_for_outputs(out, proc, 2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "interrupted" in stderr
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "interrupted" and 2 <= run["counts"]["ok"] < N_IMAGES
    check_complete_files(out)
