"""Loading: references, Hub cache, strictness, dtypes, metadata round trips."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FIXTURES, make_fake_hub_cache
from sapiens2_cli import load_model
from sapiens2_cli.hub import HubError
from sapiens2_cli.weights import CheckpointError, file_digest, read_header, save_model

SEG = FIXTURES / "parity" / "seg"
BACKBONE = FIXTURES / "parity" / "backbone_plain"


@pytest.fixture()
def seg_state():
    return load_file(SEG / "model.safetensors")


def _seg_io():
    return load_file(SEG / "io.safetensors")


def test_bf16_checkpoint_loads_exactly(tmp_path, seg_state):
    bf16 = {k: v.to(torch.bfloat16) for k, v in seg_state.items()}
    save_file(bf16, tmp_path / "bf16.safetensors")
    model = load_model(tmp_path / "bf16.safetensors")
    for k, v in model.state_dict().items():
        if k.endswith("rope_embed.periods"):
            assert v.dtype == torch.bfloat16
        else:
            assert v.dtype == torch.float32
            assert torch.equal(v, bf16[k].float()), k
    io = _seg_io()
    with torch.inference_mode():
        out = model(io["input"])
    # bf16 weights move logits by far less than their spread
    err = (out - io["output"]).abs().max().item()
    assert 0 < err < 0.05 * io["output"].abs().max().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_load_keeps_rope_bf16(dtype):
    model = load_model(SEG / "model.safetensors", dtype=dtype)
    assert model.backbone.rope_embed.periods.dtype == torch.bfloat16
    assert model.backbone.cls_token.dtype == dtype


def _mapped(path) -> bool:
    """Whether this process still maps ``path`` (Linux)."""
    import gc

    gc.collect()
    return any(line.rstrip().endswith(str(path)) for line in open("/proc/self/maps"))


def test_a_converting_load_leaves_no_view_of_the_file(tmp_path, seg_state):
    """float32 file, bf16 model: the bf16 periods buffer would otherwise stay a view of the file
    and keep the whole file mapped; a float32 load keeps its zero-copy views."""
    path = tmp_path / "fp32.safetensors"
    save_file(seg_state, path)
    assert seg_state["backbone.rope_embed.periods"].dtype == torch.bfloat16
    model = load_model(path, dtype=torch.bfloat16, fuse_qkv=False)
    assert not _mapped(path)
    torch.testing.assert_close(model.backbone.rope_embed.periods, seg_state["backbone.rope_embed.periods"], rtol=0, atol=0)
    del model
    model = load_model(path, fuse_qkv=False)
    assert _mapped(path)  # float32 on the CPU: the parameters are the file's pages
    torch.testing.assert_close(model.backbone.cls_token, seg_state["backbone.cls_token"], rtol=0, atol=0)


def test_missing_and_unexpected_keys_are_named(tmp_path, seg_state):
    broken = dict(seg_state)
    del broken["backbone.blocks.1.attn.wq.bias"]
    broken["decode_head.extra.weight"] = torch.zeros(3)
    save_file(broken, tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "broken.safetensors")
    msg = str(err.value)
    assert "broken.safetensors" in msg
    assert "missing keys: backbone.blocks.1.attn.wq.bias" in msg
    assert "unexpected keys: decode_head.extra.weight" in msg


def test_mis_shaped_key_is_named(tmp_path, seg_state):
    broken = dict(seg_state)
    broken["backbone.blocks.1.attn.q_norm.weight"] = torch.ones(8)
    save_file(broken, tmp_path / "shape.safetensors")
    with pytest.raises(CheckpointError, match=r"mis-shaped keys: backbone\.blocks\.1\.attn\.q_norm\.weight"):
        load_model(tmp_path / "shape.safetensors")


def test_missing_rope_periods_is_rederived(tmp_path, seg_state):
    state = {k: v for k, v in seg_state.items() if not k.endswith("periods")}
    save_file(state, tmp_path / "noperiods.safetensors")
    model = load_model(tmp_path / "noperiods.safetensors")
    io = _seg_io()
    with torch.inference_mode():
        torch.testing.assert_close(model(io["input"]), io["output"], atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "content,reason",
    [(b"", "not a readable safetensors file"), (b"\x00" * 64, "not a readable safetensors file")],
)
def test_not_a_safetensors_file(tmp_path, content, reason):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(content)
    with pytest.raises(CheckpointError, match=f"bad.safetensors: {reason}"):
        load_model(bad)


def test_truncated_file(tmp_path):
    data = (SEG / "model.safetensors").read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        load_model(bad)


def test_foreign_safetensors_is_rejected(tmp_path):
    save_file({"weight": torch.zeros(2, 2)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="other.safetensors: not a Sapiens2 checkpoint"):
        load_model(tmp_path / "other.safetensors")


def test_task_mismatch_and_backbone_only(tmp_path):
    with pytest.raises(CheckpointError, match="holds a seg model, not pose"):
        load_model(SEG / "model.safetensors", task="pose")
    backbone = load_model(SEG / "model.safetensors", task="pretrain")
    assert backbone.task == "pretrain" and backbone.decode_head is None
    io = _seg_io()
    with torch.inference_mode():
        torch.testing.assert_close(backbone(io["input"]), io["features"], atol=5e-5, rtol=1e-4)


def test_pretrain_file_has_no_prefix():
    model = load_model(BACKBONE / "model.safetensors")
    assert model.task == "pretrain"
    assert "cls_token" in read_header(BACKBONE / "model.safetensors").shapes


def test_missing_local_file_and_bad_reference(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_model(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="neither a local file, a zoo name"):
        load_model("not-a-model")


def test_save_model_round_trip_with_metadata(tmp_path):
    model = load_model(SEG / "model.safetensors")
    out = save_model(model, tmp_path / "release.safetensors", dtype=torch.bfloat16)
    header = read_header(out)
    assert set(header.shapes) == set(load_file(SEG / "model.safetensors"))
    assert header.metadata["sapiens2.task"] == "seg"
    assert json.loads(header.metadata["sapiens2.arch"])["embed_dims"] == 64
    assert header.dtypes["backbone.rope_embed.periods"] == "BF16"
    assert header.dtypes["backbone.cls_token"] == "BF16"
    again = load_model(out)
    assert again.info.input_size == model.info.input_size
    assert not list(tmp_path.glob(".*tmp*"))


def test_pretrain_save_uses_bare_keys(tmp_path):
    model = load_model(BACKBONE / "model.safetensors")
    out = save_model(model, tmp_path / "pre.safetensors")
    assert set(read_header(out).shapes) == set(load_file(BACKBONE / "model.safetensors"))


def test_hub_reference_from_local_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    make_fake_hub_cache(cache, "facebook/sapiens2-seg-0.4b", {"sapiens2_0.4b_seg.safetensors": SEG / "model.safetensors"})
    make_fake_hub_cache(cache, "someone/my-seg", {"model.safetensors": SEG / "model.safetensors"})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    for ref in ("seg-0.4b", "facebook/sapiens2-seg-0.4b", "facebook/sapiens2-seg-0.4b@main", "someone/my-seg"):
        model = load_model(ref)
        assert model.task == "seg", ref
        assert model.info.source == ref
    assert load_model("seg-0.4b").info.input_size == (1024, 768)
    assert file_digest(load_model("seg-0.4b").info.path) == file_digest(SEG / "model.safetensors")
    with pytest.raises(HubError, match=r"sapiens2-pose-1b/sapiens2_1b_pose.safetensors is not in the local"):
        load_model("pose-1b")


def test_keep_indices_equal_a_full_pass_when_keeping_everything():
    model = load_model(BACKBONE / "model.safetensors")
    io = load_file(BACKBONE / "io.safetensors")
    x = io["input"]
    with torch.inference_mode():
        full, (h, w) = model.backbone.forward_tokens(x)
        keep = torch.arange(h * w).expand(x.shape[0], -1)
        kept, _ = model.backbone.forward_tokens(x, keep)
        torch.testing.assert_close(kept, full, atol=0, rtol=0)
        # a subset: each sample keeps different tokens and still runs
        sub = torch.stack([torch.randperm(h * w)[: h * w // 4] for _ in range(x.shape[0])])
        part, _ = model.backbone.forward_tokens(x, sub)
    assert part.shape == (x.shape[0], 9 + h * w // 4, full.shape[-1])
