"""`sapiens2 export` through the real command line, and an ONNX file run without our code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from conftest import FIXTURES, REPO
from sapiens2_cli.cli import main

SEG = FIXTURES / "parity" / "seg" / "model.safetensors"


def run(*args):
    return CliRunner().invoke(main, list(map(str, args)))


def test_export_bf16_safetensors(tmp_path):
    out = tmp_path / "seg-bf16.safetensors"
    result = run("export", SEG, "-o", out, "--dtype", "bf16", "--input-size", "64x48")
    assert result.exit_code == 0, result.output
    assert "random [2, 3, 64, 48]: logits max|diff|" in result.output
    assert "real [1, 3, 64, 48]: logits max|diff|" in result.output
    assert f"wrote {out} (max|diff|" in result.output
    report = json.loads((tmp_path / "seg-bf16.safetensors.verify.json").read_text())
    assert report["passed"] and report["dtype"] == "bf16" and report["max_rel_diff"] <= report["tolerance"]
    assert {t.dtype for t in load_file(out).values()} == {torch.bfloat16}


def test_cli_choices_are_the_registries():
    from sapiens2_cli.export import DTYPES, FORMATS

    params = {p.name: p for p in main.commands["export"].params}
    assert list(params["fmt"].type.choices) == list(FORMATS)
    assert list(params["dtype"].type.choices) == list(DTYPES)


def test_export_usage_errors(tmp_path):
    result = run("export", SEG, "-o", tmp_path / "a.pt2", "--input-size", "64by48")
    assert result.exit_code == 2 and "is not HxW" in result.output
    result = run("export", SEG, "-o", tmp_path / "a.onnx", "--dtype", "bf16")
    assert result.exit_code == 1 and "error: onnxruntime has no bfloat16 arithmetic kernels" in result.output
    (tmp_path / "b.pt2").write_bytes(b"keep me")
    result = run("export", SEG, "-o", tmp_path / "b.pt2", "--input-size", "64x48")
    assert result.exit_code == 1 and "already exists (pass --overwrite" in result.output
    assert (tmp_path / "b.pt2").read_bytes() == b"keep me"
    result = run("export", tmp_path / "absent.safetensors", "-o", tmp_path / "c.pt2")
    assert result.exit_code == 1 and "absent.safetensors: no such checkpoint file" in result.output


def test_export_beyond_tolerance_fails_and_keeps_nothing(tmp_path):
    # onnxruntime's float32 kernels differ from eager in the last bits, so a zero tolerance fails
    result = run("export", SEG, "-o", tmp_path / "seg.onnx", "--input-size", "64x48", "--tolerance", "0")
    assert result.exit_code == 1
    assert "the onnx artifact does not reproduce the eager model; removed it" in result.output
    assert "tolerance 0: FAILED" in result.output
    assert list(tmp_path.iterdir()) == []


def test_export_subprocess_then_run_onnx_without_our_code(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "seg.onnx"
    proc = subprocess.run(
        [sys.executable, "-m", "sapiens2_cli", "export", str(SEG), "-o", str(out), "--input-size", "64x48",
         "--normalize-in-graph"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "seg.onnx.verify.json").read_text())["passed"]
    # a deployment with onnxruntime and numpy only: metadata and pixels in, logits out
    script = textwrap.dedent(
        """
        import json, sys
        import numpy as np, onnxruntime as ort
        sess = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
        meta = sess.get_modelmeta().custom_metadata_map
        h, w = map(int, meta["sapiens2.input_size"].split("x"))
        x = np.load(sys.argv[2])
        mean = np.array(json.loads(meta["sapiens2.mean_rgb"]), np.float32).reshape(1, 3, 1, 1)
        std = np.array(json.loads(meta["sapiens2.std_rgb"]), np.float32).reshape(1, 3, 1, 1)
        pixels = x * std + mean if meta["sapiens2.normalize_in_graph"] == "true" else x
        (logits,) = sess.run(None, {meta["sapiens2.input_name"]: pixels.astype(np.float32)})
        np.save(sys.argv[3], logits)
        print(meta["sapiens2.task"], h, w, len(json.loads(meta["sapiens2.class_names"])))
        assert "sapiens2_cli" not in sys.modules
        """
    )
    io = load_file(FIXTURES / "parity" / "seg" / "io.safetensors")
    import numpy as np

    np.save(tmp_path / "x.npy", io["input"].numpy())
    proc = subprocess.run(
        [sys.executable, "-I", "-c", script, str(out), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["seg", "64", "48", "29"]
    logits = torch.from_numpy(np.load(tmp_path / "y.npy"))
    assert ((logits - io["output"]).abs().max() / io["output"].abs().max()) < 1e-4
