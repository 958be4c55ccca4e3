"""Fused q/k/v projections: the same numbers, the released state-dict layout, save and load."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES
from sapiens2_cli import load_model
from sapiens2_cli.models.attention import GroupedQueryAttention
from sapiens2_cli.weights import save_model

PARITY = FIXTURES / "parity"
# backbone_plain: 18 layers, layers 8 and 9 with half the kv heads; seg: a task model
CASES = ["backbone_plain", "seg"]


def _attention(model):
    return [m for m in model.modules() if isinstance(m, GroupedQueryAttention)]


@pytest.mark.parametrize("case", CASES)
def test_fused_state_dict_is_the_released_layout(case):
    path = PARITY / case / "model.safetensors"
    separate = load_model(path, fuse_qkv=False).state_dict()
    fused = load_model(path).state_dict()
    assert list(fused) == list(separate)  # same keys, same order
    for key, tensor in separate.items():
        assert torch.equal(fused[key], tensor), key
    storages = [t.untyped_storage().data_ptr() for k, t in fused.items() if ".attn.w" in k]
    assert len(set(storages)) == len(storages), "q/k/v slices must not share memory (safetensors)"


def test_fused_layers_hold_one_projection():
    model = load_model(PARITY / "backbone_plain" / "model.safetensors")
    attn = _attention(model)
    assert attn and all(a.fused for a in attn)
    assert not any(hasattr(a, name) for a in attn for name in ("wq", "wk", "wv"))
    dim, d = 64, 16
    widths = [a.qkv_weight.shape for a in attn]
    assert widths[0] == (dim + 2 * 4 * d, dim)  # full attention: 4 kv heads
    assert widths[8] == widths[9] == (dim + 2 * 2 * d, dim)  # grouped: 2 kv heads
    assert all(a.qkv_bias.shape == (w[0],) for a, w in zip(attn, widths))
    before = [a.qkv_weight for a in attn]
    model.fuse_qkv()  # idempotent
    assert all(a.qkv_weight is b for a, b in zip(_attention(model), before))


def test_save_after_fusing_writes_the_source_file_back(tmp_path):
    src = PARITY / "seg" / "model.safetensors"
    out = save_model(load_model(src), tmp_path / "resaved.safetensors")
    written, source = load_file(out), load_file(src)
    assert set(written) == set(source)
    for key, tensor in source.items():
        assert torch.equal(written[key].to(tensor.dtype), tensor), key


def test_released_state_dict_loads_into_a_fused_model():
    path = PARITY / "backbone_plain" / "model.safetensors"
    model = load_model(path)
    state = load_model(path, fuse_qkv=False).backbone.state_dict()
    state["blocks.8.attn.wk.weight"] = torch.full_like(state["blocks.8.attn.wk.weight"], 0.5)
    state["blocks.8.attn.wv.bias"] = torch.arange(32.0)
    model.backbone.load_state_dict(state, strict=True)
    attn = _attention(model)[8]
    assert torch.equal(attn.qkv_weight[64:96], torch.full((32, 64), 0.5))  # wk rows follow wq's 64
    assert torch.equal(attn.qkv_bias[96:], torch.arange(32.0))
    with pytest.raises(RuntimeError, match="qkv_weight"):
        del state["blocks.3.attn.wq.weight"]
        model.backbone.load_state_dict(state, strict=True)


def test_fused_and_separate_agree_in_bf16():
    path = PARITY / "seg" / "model.safetensors"
    x = load_file(PARITY / "seg" / "io.safetensors")["input"].bfloat16()
    with torch.inference_mode():
        fused = load_model(path, dtype=torch.bfloat16)(x)
        separate = load_model(path, dtype=torch.bfloat16, fuse_qkv=False)(x)
    # one GEMM or three: the same products summed in the same order up to kernel choice
    torch.testing.assert_close(fused, separate, atol=1e-2, rtol=1e-2)
