"""RoPE tables covering the prefix tokens, and the per-grid cache."""

from __future__ import annotations

import pytest
import torch

from conftest import FIXTURES
from sapiens2_cli import load_model
from sapiens2_cli.models.rope import RopePositionEmbedding, apply_rope, with_prefix

PREFIX = 9  # cls + 8 storage tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("float32_tables", [False, True], ids=["bf16_tables", "rounded_fp32_tables"])
def test_identity_prefix_rows_give_the_split_rotation_bit_for_bit(dtype, float32_tables):
    sin, cos = RopePositionEmbedding(16)(6, 5)  # [30, 16]
    if float32_tables:
        sin, cos = sin.float(), cos.float()
    gen = torch.Generator().manual_seed(0)
    for scale in (1e-3, 1.0, 300.0):
        x = (torch.randn(2, 4, PREFIX + 30, 16, generator=gen) * scale).to(dtype)
        full_sin, full_cos = with_prefix(sin, cos, PREFIX)
        assert full_sin.shape == (PREFIX + 30, 16)
        assert torch.equal(apply_rope(x, full_sin, full_cos), apply_rope(x, sin, cos))
    # per-sample tables of kept tokens (masked pretraining): [B, 1, K, d]
    keep = torch.tensor([[0, 7, 29], [3, 4, 5]])
    x = torch.randn(2, 4, PREFIX + 3, 16, generator=gen).to(dtype)
    ks, kc = sin[keep][:, None], cos[keep][:, None]
    assert torch.equal(apply_rope(x, *with_prefix(ks, kc, PREFIX)), apply_rope(x, ks, kc))


def test_prefix_rows_are_the_identity_rotation():
    sin, cos = with_prefix(*RopePositionEmbedding(16)(2, 2), PREFIX)
    assert sin.dtype == cos.dtype == torch.bfloat16
    assert torch.equal(sin[:PREFIX], torch.zeros(PREFIX, 16, dtype=torch.bfloat16))
    assert torch.equal(cos[:PREFIX], torch.ones(PREFIX, 16, dtype=torch.bfloat16))


def test_model_loaded_under_inference_mode_runs_twice():
    # inference tensors have no version counter; the table cache must not ask for one
    with torch.inference_mode():
        model = load_model(FIXTURES / "parity" / "seg" / "model.safetensors")
        x = torch.zeros(1, 3, 64, 48)
        first, second = model(x), model(x)
    assert torch.equal(first, second)
    assert len(model.backbone.rope_embed._cache) == 1
