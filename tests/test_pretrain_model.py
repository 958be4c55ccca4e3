"""Student / EMA teacher: one step, EMA, parameter groups, export, the 4K variant, recipes."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest
import torch
from pretrain_synthetic import single_thread  # noqa: F401 - autouse fixture

from sapiens2_cli.models.arch import ARCHS
from sapiens2_cli.pretrain.masking import sample_masks
from sapiens2_cli.pretrain.model import PretrainModel
from sapiens2_cli.pretrain.run import resolve_pretrain_config
from sapiens2_cli.train.config import Config, ConfigError
from sapiens2_cli.train.model_setup import run_arch
from sapiens2_cli.weights import load_model, read_header

RECIPES = sorted(
    p.stem
    for p in Path(str(resources.files("sapiens2_cli") / "recipes" / "pretrain")).glob("*.yaml")
    if not p.name.startswith("_")
)


def tiny_cfg(*overrides: str) -> Config:
    return resolve_pretrain_config("tiny", overrides)


def make_batch(cfg: Config, b: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    stride = run_arch(cfg.model).stride
    (gh, gw), (lh, lw) = cfg.model.input_size, cfg.augment.local_size
    masks = sample_masks(2 * b, gh // stride, gw // stride, generator=g)
    return {
        "global_crops": torch.randn(b, 2, 3, gh, gw, generator=g),
        "local_crops": torch.randn(b, cfg.augment.num_local, 3, lh, lw, generator=g),
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
    expected = w.mae.weight * out["mae"] + w.dino.weight * out["dino"] + w.koleo.weight * out["koleo"]
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    out["loss"].backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    for part in (model.student["backbone"], model.student["dino_head"], model.decoder):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())


def test_centre_moves_in_training_only_and_once_per_step(model):
    batch = make_batch(model.cfg)
    model.eval()
    model.step(batch, it=0)
    model.update_center()
    assert model.dino_loss.center.abs().sum() == 0
    model.train()
    model.step(batch, it=0)
    assert model.dino_loss.center.abs().sum() == 0  # every micro-batch of a step: the same centre
    model.update_center()
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
    assert model.momentum(model.cfg.train.iterations) == pytest.approx(1.0)


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
    cfg = resolve_pretrain_config(
        "tiny",
        [
            "model.size=1b-4k",
            "model.arch.patch_size=16",
            "model.input_size=[256, 192]",
            "augment.local_size=[128, 128]",
            "loss.mae.target_downsample=2",
        ],
    )
    torch.manual_seed(0)
    model = PretrainModel(cfg).train()
    assert model.arch.stride == 64 and model.arch.use_tokenizer
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
def test_every_recipe_resolves_and_builds(name):
    cfg = resolve_pretrain_config(name)
    arch = run_arch(cfg.model)
    if name != "tiny":
        assert arch == ARCHS[name]
        assert cfg.augment.num_local == 4 and cfg.augment.masking.ratio == 0.75
        assert cfg.loss.mae.decoder_layers == 8 and cfg.loss.dino.prototypes == 65536
        assert (cfg.optim.lr, cfg.optim.betas, cfg.optim.weight_decay) == (1e-4, (0.9, 0.95), 0.05)
        assert (cfg.schedule.warmup_iters, cfg.schedule.decay, cfg.schedule.final_lr) == (1000, "cosine", 1e-7)
        assert (cfg.train.iterations, cfg.train.clip_grad, cfg.train.precision) == (500_000, 5.0, "bf16")
    with torch.device("meta"):
        model = PretrainModel(cfg)
    unit = arch.stride // cfg.loss.mae.target_downsample
    assert model.decoder.pred.out_features == unit * unit * 3


def test_recipes_cover_every_released_size():
    assert set(ARCHS) | {"tiny"} == set(RECIPES)


def test_tiny_recipe_keeps_its_architecture():
    arch = run_arch(tiny_cfg().model)
    assert (arch.embed_dims, arch.num_layers, arch.num_heads, arch.feedforward_channels) == (64, 4, 4, 256)
    assert (arch.patch_size, arch.n_storage_tokens, arch.use_tokenizer) == (8, 2, False)


def test_bad_keys_and_values_fail_naming_the_key():
    with pytest.raises(ConfigError, match=r"'loss.dino.protoypes' \(did you mean 'loss.dino.prototypes'"):
        tiny_cfg("loss.dino.protoypes=3")
    with pytest.raises(ConfigError, match="train.batch_size"):
        tiny_cfg("train.batch_size='8'")
    with pytest.raises(ConfigError, match=r"augment.local_size \[36, 32\] .* multiples of the 8-px cell"):
        tiny_cfg("augment.local_size=[36, 32]")
    with pytest.raises(ConfigError, match="KoLeo"):
        tiny_cfg("train.batch_size=1")
    with pytest.raises(ConfigError, match="optim.layer_decay must be null"):
        tiny_cfg("optim.layer_decay=0.9")
    with pytest.raises(ConfigError, match="data.val is not used"):
        tiny_cfg("data.val=[x]")
    with pytest.raises(ConfigError, match="loss.mae.target_downsample 3"):
        tiny_cfg("loss.mae.target_downsample=3")
    assert tiny_cfg("optim.lr=1e-4").optim.lr == 1e-4  # YAML 1.1 reads 1e-4 as a string
