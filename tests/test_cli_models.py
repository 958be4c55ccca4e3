"""`sapiens2 --version`, `models`, `download` and `inspect` through the real entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from conftest import FIXTURES, REPO, make_fake_hub_cache
from sapiens2_cli import __version__
from sapiens2_cli.cli import main

SEG = FIXTURES / "parity" / "seg" / "model.safetensors"


def run(*args, env=None):
    return CliRunner().invoke(main, list(map(str, args)), env=env)


def test_version_via_python_m():
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    out = subprocess.run(
        [sys.executable, "-m", "sapiens2_cli", "--version"], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.strip() == f"sapiens2, version {__version__}"


def test_models_lists_the_zoo_with_parameter_counts():
    result = run("models", "--json")
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.output)}
    assert rows["pretrain-0.4b"]["parameters"] == 395_450_384
    assert rows["pretrain-1b-4k"]["parameters"] == 1_606_588_944
    assert rows["pretrain-1b-4k"]["filename"] == "sapiens2_1b_4k_pretrain.safetensors"
    assert rows["seg-1b"]["repo_id"] == "facebook/sapiens2-seg-1b"
    assert rows["albedo-1b"]["note"]
    assert len(rows) == 6 + 5 * 4


@pytest.fixture()
def fake_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    cache = tmp_path / "hub"
    make_fake_hub_cache(cache, "facebook/sapiens2-seg-0.4b", {"sapiens2_0.4b_seg.safetensors": SEG})
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return cache


def test_download_reports_cached_files_and_fails_for_missing(fake_cache):
    ok = run("download", "seg-0.4b")
    assert ok.exit_code == 0, ok.output
    assert "sapiens2_0.4b_seg.safetensors" in ok.output and "sha256:" in ok.output
    bad = run("download", "seg-0.4b", "pose-1b")
    assert bad.exit_code == 1
    assert "pose-1b" in bad.output and "not in the local Hugging Face cache" in bad.output
    rows = {r["name"]: r for r in json.loads(run("models", "--json").output)}
    assert rows["seg-0.4b"]["cached"] and not rows["seg-1b"]["cached"]


def test_inspect_a_good_and_a_broken_file(tmp_path):
    good = run("inspect", SEG, "--json")
    assert good.exit_code == 0, good.output
    report = json.loads(good.output)
    assert report["task"] == "seg" and report["keys"] == 50 and report["problems"] == []
    assert report["head"]["out_channels"] == 29
    state = load_file(SEG)
    del state["backbone.blocks.1.ffn.w3.bias"]
    state["backbone.rope_embed.periods"] = state["backbone.rope_embed.periods"].float()
    save_file(state, tmp_path / "bad.safetensors")
    bad = run("inspect", tmp_path / "bad.safetensors")
    assert bad.exit_code == 1
    assert "missing keys: backbone.blocks.1.ffn.w3.bias" in bad.output
    assert "F32=" in bad.output


def test_inspect_not_a_checkpoint(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"garbage")
    result = run("inspect", tmp_path / "x.safetensors")
    assert result.exit_code == 1
    assert "x.safetensors: not a readable safetensors file" in result.output
