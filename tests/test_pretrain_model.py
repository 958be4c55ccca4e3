"""Student / EMA teacher: one step, EMA, parameter groups, export, the 4K variant, recipes."""

from __future__ import annotations

import dataclasses
from importlib import resources
from pathlib import Path

import pytest
import torch
from pretrain_synthetic import single_thread  # noqa: F401 - autouse fixture

from sapiens2_cli.models.arch import ARCHS
from sapiens2_cli.pretrain.config import PretrainConfig, load_recipe
from sapiens2_cli.pretrain.masking import sample_masks
from sapiens2_cli.pretrain.model import PretrainModel
from sapiens2_cli.weights import load_model, read_header

RECIPES = sorted(
    p.stem for p in Path(str(resources.files("sapiens2_cli") / "recipes" / "pretrain")).glob("*.yaml")
)


def tiny_cfg(**sections) -> PretrainConfig:
    cfg = load_recipe("tiny")
    for name, values in sections.items():
        setattr(cfg, name, dataclasses.replace(getattr(cfg, name), **values))
    return cfg


def make_batch(cfg: PretrainConfig, b: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    stride = cfg.model.build_arch().stride
    (gh, gw), (lh, lw) = cfg.crops.global_size, cfg.crops.local_size
    masks = sample_masks(2 * b, gh // stride, gw // stride, generator=g)
    return {
        "global_crops": torch.randn(b, 2, 3, gh, gw, generator=g),
        "local_crops": torch.randn(b, cfg.crops.num_local, 3, lh, lw, generator=g),
        "keep": masks.keep.view(b, 2, -1),
        "masked": masks.masked.view(b, 2, -1),
    }


@pytest.fixture
def model() -> PretrainModel:
    torch.manual_seed(0)
    return PretrainModel(tiny_cfg()).train()


def test_teacher_starts_as_an_exact_copy_without_gradients(model):
    student, teacher = model.student.state_dict(), model.teacher.state_dict()
    assert student.keys() == teacher.keys()
    assert all(torch.equal(student[k], teacher[k]) for k in student)
    assert not any(p.requires_grad for p in model.teacher.parameters())
    assert not model.teacher.training and model.student.training


def test_step_returns_finite_terms_and_trains_only_the_student(model):
    out = model.step(make_batch(model.cfg), it=0)
    assert set(out) == {"loss", "mae", "dino", "koleo", "teacher_temp"}
    assert all(torch.isfinite(v) for v in out.values())
    assert out["teacher_temp"].item() == pytest.approx(0.065)
    w = model.cfg.loss
    expected = w.mae * out["mae"] + w.dino * out["dino"] + w.koleo * out["koleo"]
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    out["loss"].backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    for part in (model.student["backbone"], model.student["dino_head"], model.decoder):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())


def test_centre_moves_in_training_only(model):
    batch = make_batch(model.cfg)
    model.eval()
    model.step(batch, it=0)
    assert model.dino_loss.center.abs().sum() == 0
    model.train()
    model.step(batch, it=0)
    assert model.dino_loss.center.abs().sum() > 0


def test_update_teacher_is_the_ema_formula(model):
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(0.5)
    t_before = [p.clone() for p in model.teacher.parameters()]
    s_now = [p.detach().clone() for p in model.student.parameters()]
    model.update_teacher(0.9)
    for t_new, t_old, s in zip(model.teacher.parameters(), t_before, s_now, strict=True):
        torch.testing.assert_close(t_new, 0.9 * t_old + 0.1 * s)
    assert model.momentum(0) == pytest.approx(0.9)
    assert model.momentum(model.cfg.optim.iters) == pytest.approx(1.0)


def test_parameter_groups_skip_decay_for_norms_biases_and_tokens(model):
    decay, no_decay = model.param_groups(0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    for name in (
        "student.backbone.cls_token",
        "student.backbone.storage_tokens",
        "decoder.mask_token",
        "student.backbone.blocks.0.ln1.weight",
        "student.backbone.blocks.0.attn.wq.bias",
        "student.backbone.blocks.0.attn.gamma.weight",
    ):
        assert name in kept, name
    for name in ("student.backbone.blocks.0.attn.wq.weight", "student.dino_head.prototypes", "decoder.pred.weight"):
        assert name in decayed, name
    assert not any(n.startswith("teacher.") for n in decayed | kept)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decayed | kept == trainable and not decayed & kept


def test_export_teacher_is_a_release_pretrain_checkpoint(model, tmp_path):
    with torch.no_grad():  # make the teacher differ from the student
        for p in model.student.parameters():
            p.add_(0.01)
    model.update_teacher(0.5)
    path = model.export_teacher(tmp_path / "teacher.safetensors", metadata={"pretrain_steps": "7"})
    header = read_header(path)
    assert "cls_token" in header.shapes and not any(k.startswith("backbone.") for k in header.shapes)
    assert header.metadata["sapiens2.task"] == "pretrain"
    assert header.metadata["sapiens2.pretrain_steps"] == "7"
    loaded = load_model(path)
    assert loaded.task == "pretrain" and loaded.info.arch == model.arch
    teacher = model.teacher["backbone"].state_dict()
    for key, tensor in loaded.backbone.state_dict().items():
        assert torch.equal(tensor, teacher[key]), key
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(loaded(x), model.teacher["backbone"](x), rtol=0, atol=0)


def test_4k_variant_masks_after_the_tokenizer_and_rebuilds_at_half_resolution():
    cfg = tiny_cfg(
        model={"use_tokenizer": True, "num_tokenizer_layers": 1, "patch_size": 16},
        crops={"global_size": (256, 192), "local_size": (128, 128)},
        decoder={"target_downsample": 2},
    )
    cfg.validate()
    torch.manual_seed(0)
    model = PretrainModel(cfg).train()
    assert model.arch.stride == 64
    assert model.decoder.pred.out_features == 32 * 32 * 3  # a 64-px cell at half resolution
    batch = make_batch(cfg, b=2)
    assert batch["keep"].shape[-1] + batch["masked"].shape[-1] == 4 * 3  # post-tokenizer cells
    views = batch["global_crops"][:, 0]
    tokens, grid = model.student["backbone"].forward_tokens(views, batch["keep"][:, 0])
    assert grid == (4, 3) and tokens.shape[1] == model.student["backbone"].num_prefix + 3
    out = model.step(batch, it=0)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_loads_validates_and_builds(name):
    cfg = load_recipe(name)
    arch = cfg.model.build_arch()
    if name != "tiny":
        assert arch == ARCHS[name]
        assert cfg.crops.num_local == 4 and cfg.masking.ratio == 0.75 and cfg.decoder.layers == 8
    with torch.device("meta"):
        model = PretrainModel(cfg)
    unit = arch.stride // cfg.decoder.target_downsample
    assert model.decoder.pred.out_features == unit * unit * 3
    assert cfg.to_dict() == PretrainConfig.from_dict(cfg.to_dict()).to_dict()


def test_recipes_cover_every_released_size():
    assert set(ARCHS) | {"tiny"} == set(RECIPES)


def test_unknown_keys_fail_with_a_suggestion():
    with pytest.raises(ValueError, match=r"unknown key 'protoypes'.*did you mean 'prototypes'"):
        PretrainConfig.from_dict({"dino": {"protoypes": 3}})
    with pytest.raises(ValueError, match="expected int"):
        PretrainConfig.from_dict({"data": {"batch_size": "8"}})
    with pytest.raises(ValueError, match="multiple of 16"):
        PretrainConfig.from_dict({"model": {"arch": "0.4b"}, "crops": {"global_size": [100, 96]}}).validate()
    assert PretrainConfig.from_dict({"optim": {"lr": "1e-4"}}).optim.lr == 1e-4
