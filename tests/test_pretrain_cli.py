"""``sapiens2 pretrain`` command line: every recipe validates with ``--dry-run``, bad input exits
2 (or 1 for data) with the reason, the teacher export has exactly the released key layout, and
a pretraining run's weights start a fine-tuning run."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest
import torch
import yaml
from conftest import FIXTURES, SPEC
from finetune_runs import seg_learnable
from pretrain_runs import cli, pretrain
from pretrain_synthetic import make_images, single_thread, write_folder  # noqa: F401 - autouse fixture
from safetensors.torch import load_file

from sapiens2_cli.models.arch import ARCHS
from sapiens2_cli.pretrain.model import PretrainModel
from sapiens2_cli.pretrain.run import resolve_pretrain_config
from sapiens2_cli.train.config import RECIPES_DIR, resolve, to_yaml
from sapiens2_cli.train.model_setup import Labels, build_model, initialise
from sapiens2_cli.weights import read_header

RECIPES = sorted(
    p.stem
    for p in Path(str(resources.files("sapiens2_cli") / "recipes" / "pretrain")).glob("*.yaml")
    if not p.name.startswith("_")
)
BACKBONES = json.loads((SPEC / "data" / "backbone_state_dict.json").read_text())["archs"]


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_validates_with_dry_run(name):
    result = cli("pretrain", "--recipe", name, "--dry-run")
    assert result.exit_code == 0, result.output
    assert result.output == to_yaml(resolve_pretrain_config(name))
    assert yaml.safe_load(result.output)["task"] == "pretrain"


def test_dry_run_takes_a_recipe_file_the_data_folder_and_overrides(tmp_path):
    result = cli(
        "pretrain", "--recipe", RECIPES_DIR / "pretrain" / "1b.yaml", "--dry-run", "--data", "shards",
        "train.batch_size=3", "loss.dino.prototypes=1024",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    cfg = yaml.safe_load(result.output)
    assert [d["path"] for d in cfg["data"]["train"]] == ["shards"]
    assert cfg["train"]["batch_size"] == 3 and cfg["loss"]["dino"]["prototypes"] == 1024
    assert cfg["model"]["size"] == "1b" and cfg["train"]["iterations"] == 500_000


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dry-run"], "--recipe is required"),
        (["--recipe", "tiny"], "-o/--output is required"),
        (["--recipe", "tiyn", "--dry-run"], "did you mean pretrain/tiny"),
        (["--recipe", "tiny", "--dry-run", "loss.dino.protoypes=3"], "did you mean 'loss.dino.prototypes'"),
        (["--recipe", "tiny", "--dry-run", "augment.masking.ratio=1.5"], "augment.masking.ratio must be in (0, 1)"),
        (["--recipe", "seg/tiny", "--dry-run"], "fine-tune with `sapiens2 finetune`"),
    ],
)
def test_usage_errors_exit_2(args, message, tmp_path):
    result = cli("pretrain", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_finetune_refuses_a_pretrain_recipe():
    result = cli("finetune", "--recipe", "pretrain/tiny", "--dry-run")
    assert result.exit_code == 2 and "run it with `sapiens2 pretrain`" in result.output


def test_missing_data_exits_1_after_writing_the_config(tmp_path):
    run = tmp_path / "run"
    result = cli("pretrain", "--recipe", "tiny", "--data", tmp_path / "nowhere", "-o", run)
    assert result.exit_code == 1 and "no such data directory" in result.output
    assert resolve(run / "config.yaml").data.train[0].path == str(tmp_path / "nowhere")


@pytest.mark.parametrize("size", list(ARCHS))
def test_teacher_backbone_has_the_released_keys(size):
    """What ``final.safetensors`` holds for each released size: the official backbone's keys."""
    spec = BACKBONES["sapiens2_" + size.replace("-", "_")]
    with torch.device("meta"):
        model = PretrainModel(resolve_pretrain_config(size))
    got = {k: list(v.shape) for k, v in model.teacher["backbone"].state_dict().items()}
    assert got == {k: shape for k, shape, _ in spec["state_dict"]}
    assert len(got) == spec["num_tensors"]


def test_export_has_exactly_the_keys_of_an_official_backbone_file(tmp_path):
    """The official code's own backbone file (fixture ``backbone_plain``, written by its
    ``state_dict``) and our export of the same architecture: the same keys and shapes, so the
    official ``load_state_dict(strict=True)`` accepts ours."""
    case = FIXTURES / "parity" / "backbone_plain"
    official = json.loads((case / "config.json").read_text())["arch"]
    arch = (
        f"{{embed_dims: {official['embed_dims']}, num_layers: {official['num_layers']}, "
        f"num_heads: {official['num_heads']}, ffn: {official['feedforward_channels']}, "
        f"patch_size: {official['patch_size']}, n_storage_tokens: {official['n_storage_tokens']}}}"
    )
    cfg = resolve_pretrain_config("tiny", [f"model.arch={arch}", "model.input_size=[128, 96]", "augment.local_size=[64, 48]"])
    torch.manual_seed(0)
    path = PretrainModel(cfg).export_teacher(tmp_path / "teacher.safetensors")
    ours = {k: tuple(s) for k, s in read_header(path).shapes.items()}
    theirs = {k: tuple(v.shape) for k, v in load_file(case / "model.safetensors").items()}
    assert ours == theirs


def test_finetune_starts_from_a_pretraining_run(tmp_path):
    write_folder(tmp_path / "images", make_images(4, seed=1, size=72)[0])
    run = tmp_path / "pretrain"
    pretrain(tmp_path / "images", run, "train.iterations=2", "schedule.warmup_iters=1", "train.batch_size=4")
    final = run / "final.safetensors"
    # the tiny pretraining backbone under the seg/tiny head
    same_arch = [
        "model.arch={embed_dims: 64, num_layers: 4, num_heads: 4, ffn: 256, patch_size: 8, n_storage_tokens: 2}",
        f"model.init={final}",
    ]
    cfg = resolve("seg/tiny", same_arch)
    model = build_model(cfg, Labels(29))
    initialise(model, cfg.model)
    teacher = load_file(final)
    assert model.backbone.state_dict().keys() == teacher.keys()
    assert all(torch.equal(v, teacher[k]) for k, v in model.backbone.state_dict().items())

    seg = seg_learnable(tmp_path / "seg")
    ft = tmp_path / "finetune"
    result = cli(
        "finetune", "--recipe", "seg/tiny", "--data", seg, "-o", ft, *same_arch,
        "train.iterations=2", "schedule.warmup_iters=1", "eval.interval=0",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"initialised the backbone from {final}" in (ft / "train.log").read_text()
