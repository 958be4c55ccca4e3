"""``sapiens2 finetune`` command line: every shipped recipe validates with ``--dry-run``; bad
recipes, overrides and missing inputs exit 2 with the reason and write nothing."""

from __future__ import annotations

import pytest
import yaml
from click.testing import CliRunner

from sapiens2_cli.cli import main
from sapiens2_cli.train.config import RECIPES_DIR, available_recipes, resolve, to_yaml


def test_every_task_and_size_has_a_recipe():
    names = available_recipes()
    for task in ("seg", "pose", "normal", "pointmap", "albedo"):
        for size in ("0.4b", "0.8b", "1b", "5b", "tiny"):
            assert f"{task}/{size}" in names


@pytest.mark.parametrize("recipe", [r for r in available_recipes() if not r.startswith("pretrain/")])
def test_every_shipped_recipe_validates_with_dry_run(recipe):
    result = CliRunner().invoke(main, ["finetune", "--recipe", recipe, "--dry-run"])
    assert result.exit_code == 0, result.output
    assert result.output == to_yaml(resolve(recipe))
    assert yaml.safe_load(result.output)["task"] == recipe.split("/")[0]


def test_dry_run_applies_folders_overrides_and_recipe_files(tmp_path):
    result = CliRunner().invoke(
        main,
        ["finetune", "--recipe", str(RECIPES_DIR / "pose" / "1b.yaml"), "--dry-run",
         "--data", "a", "--data", "b", "--val-data", "v", "optim.lr=1e-4", "train.batch_size=3"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    cfg = yaml.safe_load(result.output)
    assert [d["path"] for d in cfg["data"]["train"]] == ["a", "b"]
    assert [d["path"] for d in cfg["data"]["val"]] == ["v"]
    assert cfg["optim"]["lr"] == 1e-4 and cfg["train"]["batch_size"] == 3
    assert cfg["train"]["iterations"] == 20000 and cfg["optim"]["layer_decay"] == 0.9
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--recipe", "seg/2b", "--dry-run"], "no recipe named 'seg/2b'; did you mean"),
        (["--recipe", "seg/tiny", "--dry-run", "optim.lrr=1"], "did you mean 'optim.lr'?"),
        (
            ["--recipe", "seg/tiny", "--dry-run", "model.head.upsample_channels=[8]"],
            "not used by the seg head",
        ),
        (["--recipe", "seg/tiny", "-o", "RUN"], "no training data: pass --data DIR"),
        (
            ["--recipe", "seg/tiny", "--dry-run", "checkpoint.keep=0"],
            "checkpoint.keep must be >= 1",
        ),
    ],
)
def test_bad_configuration_exits_2_with_the_reason(tmp_path, args, message):
    args = [a.replace("RUN", str(tmp_path / "run")) for a in args]
    result = CliRunner().invoke(main, ["finetune", *args])
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "run").exists()


def test_evaluate_rejects_a_label_set_the_model_does_not_predict(tmp_path):
    from finetune_runs import seg_learnable

    from sapiens2_cli.train.model_setup import Labels, build_model
    from sapiens2_cli.weights import save_model

    model = save_model(build_model(resolve("seg/tiny"), Labels(29)), tmp_path / "m.safetensors")
    data = seg_learnable(tmp_path / "data")
    (data / "classes.json").write_text('{"classes": ["background", "person", "hat"]}')
    result = CliRunner().invoke(main, ["evaluate", str(model), "-t", "seg", "--data", str(data)])
    assert result.exit_code == 1
    assert "3 classes but" in result.output and "predicts 29" in result.output
    bad = CliRunner().invoke(
        main, ["evaluate", str(model), "-t", "seg", "--data", str(data), "--input-size", "64"]
    )
    assert bad.exit_code == 2 and "--input-size must look like 1024x768" in bad.output


def test_input_size_must_tile_the_backbone_cells():
    """The 4K backbone pools 4x4 patches into one token: its inputs are multiples of 64 px."""
    args = ["finetune", "--recipe", "seg/tiny", "model.size=1b-4k", "--dry-run"]
    bad = CliRunner().invoke(main, [*args, "model.input_size=[1040, 768]"])
    assert bad.exit_code == 2
    assert "error: model.input_size [1040, 768] must be multiples of the 64-px cell of the 1b-4k backbone" in bad.output
    good = CliRunner().invoke(main, [*args, "model.input_size=[1024, 768]"])
    assert good.exit_code == 0, good.output
    assert yaml.safe_load(good.output)["model"]["input_size"] == [1024, 768]
