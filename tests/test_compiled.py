"""``compile_model`` keeps the official bf16 RoPE rounding: compiled models pass parity."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from conftest import FIXTURES
from sapiens2_cli import load_model
from sapiens2_cli.models.compiled import compile_model

CASE = FIXTURES / "parity" / "backbone_plain"  # 18 layers, grouped-query layers included


def test_compiled_model_matches_the_official_outputs():
    cfg = json.loads((CASE / "config.json").read_text())
    io = load_file(CASE / "io.safetensors")
    compiled = compile_model(load_model(CASE / "model.safetensors"))
    with torch.inference_mode():
        out = compiled(io["input"])
    # plain torch.compile fuses the rotation in float32 and misses by ~5e-3 (25x the tolerance)
    torch.testing.assert_close(out, io["output"], atol=cfg["atol"], rtol=cfg["rtol"])


def test_predict_compile_keeps_the_official_rounding():
    """``sapiens2 predict --compile`` (``Predictor(compile=True)``) gives the eager outputs within
    the seg fixture's tolerance; plain torch.compile moved them by ~5e-3."""
    import numpy as np

    from sapiens2_cli.predict import Predictor
    from sapiens2_cli.tasks import TASKS

    case = FIXTURES / "parity" / "seg"
    cfg = json.loads((case / "config.json").read_text())
    model = load_model(case / "model.safetensors")
    h, w = load_file(case / "io.safetensors")["input"].shape[-2:]
    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, h, w, 3), dtype=np.uint8))
    device = torch.device("cpu")
    eager = Predictor(model, TASKS["seg"], device=device)(pixels)
    compiled = Predictor(model, TASKS["seg"], device=device, compile=True)(pixels)
    torch.testing.assert_close(compiled, eager, atol=cfg["atol"], rtol=cfg["rtol"])
