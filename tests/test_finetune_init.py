"""Model construction and initialisation from the config: released shapes with overrides,
``model.init`` (pretrain backbone, task checkpoints with a matching or a different head) and
``model.load_from``."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from conftest import make_fake_hub_cache

from sapiens2_cli.models.arch import ARCHS
from sapiens2_cli.models.heads import official_head
from sapiens2_cli.models.sapiens2 import Sapiens2Model
from sapiens2_cli.train.config import ConfigError, resolve
from sapiens2_cli.train.model_setup import Labels, build_model, initialise, run_arch, run_head
from sapiens2_cli.weights import CheckpointError, save_model


@pytest.fixture
def caplog(caplog, monkeypatch):
    """``caplog`` that also sees the ``sapiens2`` logger after a run made it non-propagating."""
    monkeypatch.setattr(logging.getLogger("sapiens2"), "propagate", True)
    return caplog


def _tiny(task: str, *overrides: str):
    return resolve(f"{task}/tiny", list(overrides))


@pytest.mark.parametrize("task", ["seg", "pose", "normal", "pointmap", "albedo"])
@pytest.mark.parametrize("size", ["0.4b", "1b", "5b"])
def test_released_recipes_build_the_released_heads(task, size):
    cfg = resolve(f"{task}/{size}")
    arch = run_arch(cfg.model)
    assert arch == ARCHS[size]
    out = {"seg": 29, "pose": 308}.get(task, 3)
    assert run_head(cfg, arch, out) == official_head(task, size, arch.embed_dims)


def test_tiny_overrides_shape_the_model():
    cfg = _tiny("pointmap")
    model = build_model(cfg, Labels(3))
    arch = model.backbone.arch
    assert (arch.embed_dims, arch.num_layers, arch.num_heads, arch.feedforward_channels) == (
        64,
        2,
        4,
        128,
    )
    assert arch.kv_heads == (4, 4)
    head = model.info.head
    assert head.upsample_channels == (32, 32, 16, 16) and head.scale_mlp == (16 * 2 * 2, 32, 16, 1)
    xyz, scale = model(torch.zeros(1, 3, 64, 48))
    assert xyz.shape == (1, 3, 64, 48) and scale.shape == (1, 1)
    with pytest.raises(
        ConfigError, match="model.head.deconv_channels is not used by the pointmap head"
    ):
        run_head(_tiny("pointmap", "model.head.deconv_channels=[8]"), arch, 3)


def _saved(tmp_path, cfg, labels: Labels, name: str) -> tuple[Sapiens2Model, str]:
    torch.manual_seed(123)
    model = build_model(cfg, labels)
    return model, str(save_model(model, tmp_path / name))


def test_task_checkpoint_with_another_head_gives_its_backbone_only(tmp_path, caplog):
    cfg = _tiny("seg")
    source, path = _saved(tmp_path, cfg, Labels(29), "seg29.safetensors")
    torch.manual_seed(0)
    model = build_model(cfg, Labels(5))
    fresh_head = {k: v.clone() for k, v in model.decode_head.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="sapiens2"):
        initialise(model, dataclasses.replace(cfg.model, init=path))
    for key, value in source.backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value), key
    assert model.decode_head.conv_seg.weight.shape[0] == 5
    for key, value in fresh_head.items():
        assert torch.equal(model.decode_head.state_dict()[key], value), key
    assert "seg head with 29 outputs does not fit this run's seg head with 5 outputs" in caplog.text
    assert "newly initialised" in caplog.text


def test_task_checkpoint_with_the_same_head_gives_everything(tmp_path):
    cfg = _tiny("seg")
    source, path = _saved(tmp_path, cfg, Labels(29), "seg29.safetensors")
    torch.manual_seed(0)
    model = build_model(cfg, Labels(29))
    initialise(model, dataclasses.replace(cfg.model, init=path))
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_pretrain_init_loads_the_zoo_backbone_of_the_size(tmp_path, monkeypatch):
    cfg = _tiny("normal")
    backbone = build_model(cfg, Labels(3))
    pretrain = Sapiens2Model("pretrain", backbone.backbone.arch, None)
    pretrain.backbone.load_state_dict(backbone.backbone.state_dict())
    file = save_model(pretrain, tmp_path / "pre.safetensors")
    cache = tmp_path / "hub"
    make_fake_hub_cache(
        cache, "facebook/sapiens2-pretrain-0.4b", {"sapiens2_0.4b_pretrain.safetensors": file}
    )
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    torch.manual_seed(7)
    model = build_model(cfg, Labels(3))
    initialise(model, dataclasses.replace(cfg.model, init="pretrain"))  # size 0.4b
    for key, value in pretrain.backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value), key

    wider = _tiny("normal", "model.arch.embed_dims=128")
    with pytest.raises(
        CheckpointError, match="its backbone is 64 dims x 2 layers.*this run's is 128"
    ):
        initialise(build_model(wider, Labels(3)), dataclasses.replace(wider.model, init="pretrain"))


def test_load_from_copies_matching_tensors_and_keeps_the_rest(tmp_path, caplog):
    cfg = _tiny("seg")
    source, path = _saved(tmp_path, cfg, Labels(29), "seg29.safetensors")
    torch.manual_seed(0)
    model = build_model(cfg, Labels(7))
    before = model.decode_head.conv_seg.weight.clone()
    with caplog.at_level(logging.INFO, logger="sapiens2"):
        initialise(model, dataclasses.replace(cfg.model, init=None, load_from=path))
    assert torch.equal(
        model.backbone.blocks[1].ffn.w3.weight, source.backbone.blocks[1].ffn.w3.weight
    )
    assert torch.equal(model.decode_head.conv_seg.weight, before)  # [7, ...] vs [29, ...]: kept
    assert (
        "kept 2 whose name or shape differ (decode_head.conv_seg.weight, decode_head.conv_seg.bias)"
        in caplog.text
    )
