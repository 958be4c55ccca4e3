"""Training configuration: defaults, recipes (official numbers), overrides, errors, round trip."""

from __future__ import annotations

import dataclasses

import pytest

from sapiens2_cli.train.config import (
    RECIPES_DIR,
    ConfigError,
    available_recipes,
    parse_overrides,
    recipe_path,
    resolve,
    to_yaml,
    write_config,
)
from sapiens2_cli.train.task_config import PoseAugment, SegLoss

TASKS = ("pose", "seg", "normal", "pointmap", "albedo")
SIZES = ("0.4b", "0.8b", "1b", "5b")

# training spec §1.8 (iters, base LR, LLRD, clip, bs/GPU) and §1.4 (precision, strategy)
OFFICIAL = {
    ("pose", "0.4b"): (10000, 5e-4, 0.80, 2.0, 6, "bf16", "fsdp"),
    ("pose", "0.8b"): (10000, 5e-4, 0.85, 4.0, 12, "bf16", "fsdp"),
    ("pose", "1b"): (20000, 5e-4, 0.90, 4.0, 7, "bf16", "fsdp"),
    ("pose", "5b"): (20000, 1e-4, 0.94, 4.0, 2, "bf16", "fsdp"),
    ("seg", "0.4b"): (20000, 5e-4, 0.80, 2.0, 12, "bf16", "ddp"),
    ("seg", "0.8b"): (30000, 5e-4, 0.85, 4.0, 5, "fp32", "ddp"),
    ("seg", "1b"): (20000, 5e-4, 0.90, 4.0, 8, "bf16", "fsdp"),
    ("seg", "5b"): (50000, 5e-4, 0.94, 4.0, 2, "bf16", "fsdp"),
    ("normal", "0.4b"): (20000, 5e-4, 0.80, 2.0, 20, "bf16", "fsdp"),
    ("normal", "0.8b"): (10000, 5e-4, 0.85, 4.0, 12, "bf16", "fsdp"),
    ("normal", "1b"): (40000, 5e-4, 0.90, 4.0, 7, "bf16", "fsdp"),
    ("normal", "5b"): (40000, 1e-4, 0.94, 4.0, 3, "bf16", "fsdp"),
    ("pointmap", "0.4b"): (20000, 5e-4, 0.80, 2.0, 8, "fp32", "fsdp"),
    ("pointmap", "0.8b"): (20000, 5e-4, 0.85, 2.0, 6, "fp32", "fsdp"),
    ("pointmap", "1b"): (40000, 5e-4, 0.90, 4.0, 3, "fp32", "fsdp"),
    ("pointmap", "5b"): (40000, 1e-4, 0.94, 4.0, 1, "fp32", "fsdp"),
    ("albedo", "0.4b"): (20000, 5e-4, 0.80, 2.0, 20, "bf16", "fsdp"),
    ("albedo", "0.8b"): (20000, 5e-4, 0.85, 4.0, 12, "bf16", "fsdp"),
    ("albedo", "1b"): (40000, 5e-4, 0.90, 4.0, 7, "bf16", "fsdp"),
    ("albedo", "5b"): (40000, 5e-4, 0.94, 4.0, 3, "bf16", "fsdp"),
}
INTERVALS = {
    ("seg", "5b"): (10000, 2000),
    ("albedo", "0.8b"): (10000, 1000),
    ("albedo", "5b"): (40000, 1000),
}


def test_shipped_recipes_are_listed_without_bases():
    names = available_recipes()
    pretrain = [f"pretrain/{s}" for s in ("0.1b", "0.4b", "0.8b", "1b", "5b", "1b-4k", "tiny")]
    assert names == sorted([f"{t}/{s}" for t in TASKS for s in (*SIZES, "tiny")] + pretrain)
    assert (RECIPES_DIR / "seg" / "_base.yaml").is_file()


@pytest.mark.parametrize(("task", "size"), sorted(OFFICIAL))
def test_official_recipe_numbers(task, size):
    cfg = resolve(f"{task}/{size}")
    iters, lr, decay, clip, batch, precision, strategy = OFFICIAL[(task, size)]
    assert (cfg.task, cfg.model.size) == (task, size)
    assert cfg.train.iterations == iters
    assert cfg.optim.lr == pytest.approx(lr)
    assert cfg.optim.layer_decay == pytest.approx(decay)
    assert cfg.train.clip_grad == clip
    assert cfg.train.batch_size == batch
    assert (cfg.train.precision, cfg.train.distributed) == (precision, strategy)
    assert cfg.train.activation_checkpointing is (task != "pose")
    assert (cfg.eval.interval, cfg.checkpoint.interval) == INTERVALS.get((task, size), (1000, 1000))
    # shared numbers (§1.2, §1.3) come from the typed defaults
    assert cfg.optim.betas == (0.9, 0.999) and cfg.optim.weight_decay == 0.1
    assert (cfg.schedule.warmup_iters, cfg.schedule.warmup_start_factor, cfg.schedule.decay) == (
        500,
        1e-3,
        "linear",
    )
    assert cfg.model.input_size == (1024, 768) and cfg.model.init == "pretrain"
    assert cfg.train.grad_accum == 1 and cfg.train.seed == 0


@pytest.mark.parametrize("task", TASKS)
def test_tiny_recipes(task):
    cfg = resolve(f"{task}/tiny")
    assert cfg.model.input_size == (64, 48)
    assert dataclasses.astuple(cfg.model.arch) == (64, 2, 4, 128, None, None)
    assert cfg.model.init is None and cfg.train.precision == "fp32"
    assert cfg.train.iterations == 40 and cfg.schedule.warmup_iters == 5


def test_task_sections_have_released_defaults():
    seg = resolve("seg/1b")
    assert seg.loss == SegLoss(ce_weight=1.0, dice_weight=1.0, dice_eps=1e-3, class_weights=None)
    assert (seg.augment.flip.p, seg.augment.rotate.max_degrees, seg.augment.resize_ratio) == (
        0.5,
        60.0,
        (0.4, 2.0),
    )
    pose = resolve("pose/1b")
    assert isinstance(pose.augment, PoseAugment)
    assert (pose.augment.photometric.p, pose.augment.coarse_dropout.p, pose.loss.weight) == (
        0.8,
        1.0,
        10.0,
    )
    normal = resolve("normal/1b")
    assert (normal.loss.cosine_weight, normal.loss.l1_weight, normal.loss.grad_weight) == (
        10.0,
        1.0,
        10.0,
    )
    assert (normal.augment.flip.p, normal.augment.down_up.p, normal.augment.solarize.threshold) == (
        0.3,
        0.2,
        128,
    )
    pointmap = resolve("pointmap/1b")
    assert (pointmap.loss.l1_weight, pointmap.loss.normal_weight, pointmap.loss.scale_weight) == (
        2.0,
        2.0,
        4.0,
    )
    assert pointmap.augment.canonical_focal == 768.0
    albedo = resolve("albedo/1b")
    assert (albedo.augment.noise.p, albedo.loss.chroma_weight) == (0.2, 1.0)


def test_overrides_types_and_merging():
    cfg = resolve(
        "seg/1b",
        [
            "optim.lr=1e-4",  # YAML 1.1 reads this as a string; float fields accept it
            "model.input_size=[512, 384]",
            "model.arch={embed_dims: 64}",
            "model.arch.num_layers=2",
            "data.train=/data/a",
            "data.val=[/data/b, {path: /data/c, repeat: 2}]",
            "augment.flip.p=0.25",
            "loss.class_weights=[1, 2]",
            "train.clip_grad=null",
        ],
    )
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.model.input_size == (512, 384)
    assert (cfg.model.arch.embed_dims, cfg.model.arch.num_layers, cfg.model.arch.num_heads) == (
        64,
        2,
        None,
    )
    assert [d.path for d in cfg.data.train] == ["/data/a"]
    assert [(d.path, d.repeat) for d in cfg.data.val] == [("/data/b", 1), ("/data/c", 2)]
    assert cfg.augment.flip.p == 0.25 and cfg.loss.class_weights == [1.0, 2.0]
    assert cfg.train.clip_grad is None
    assert cfg.train.iterations == 20000  # untouched by the overrides


def test_override_parsing():
    assert parse_overrides(["a.b=1", "a.c=[1, 2]", "d=x", "a.b=2"]) == {
        "a": {"b": 2, "c": [1, 2]},
        "d": "x",
    }
    with pytest.raises(ConfigError, match="dotted.key=value"):
        parse_overrides(["optim.lr"])
    with pytest.raises(ConfigError, match="dotted.key=value"):
        parse_overrides(["optim..lr=1"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=1", "unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"),
        ("augment.flipp.p=1", "did you mean 'augment.flip'"),
        ("trian.iterations=1", "did you mean 'train'"),
        ("optim.lr=fast", "config key 'optim.lr' expects float, got 'fast' (str)"),
        ("train.iterations=1.5", "config key 'train.iterations' expects int"),
        ("train.compile=yes please", "config key 'train.compile' expects bool"),
        (
            "train.precision=bf61",
            "must be one of 'fp32', 'bf16'; got 'bf61' (str) (did you mean 'bf16'?)",
        ),
        ("model.input_size=[64]", "config key 'model.input_size' expects 2 values"),
        ("model.arch=3", "config key 'model.arch' expects a mapping"),
        ("augment.flip.p=1.5", "augment.flip.p is a probability"),
        ("schedule.warmup_iters=30000", "schedule.warmup_iters (30000) must be in"),
        ("model.input_size=[100, 48]", "multiples of 16"),
        ("augment.resize_ratio=[2.0, 0.4]", "augment.resize_ratio is a [low, high] range"),
    ],
)
def test_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        resolve("seg/1b", [override])
    assert message in str(err.value)


def test_task_and_recipe_lookup_errors():
    with pytest.raises(ConfigError, match=r"unknown task 'segg' \(did you mean 'seg'\?\)"):
        resolve(None, ["task=segg"])
    with pytest.raises(ConfigError, match="no task given"):
        resolve(None, [])
    with pytest.raises(ConfigError, match="no recipe named 'seg/1bb'; did you mean seg/1b"):
        resolve("seg/1bb")
    with pytest.raises(ConfigError, match="does not exist"):
        recipe_path("/nonexistent/recipe.yaml")


def test_recipe_files_with_base_chain(tmp_path):
    (tmp_path / "parent.yaml").write_text("base: seg/1b\ntrain:\n  iterations: 1234\n")
    (tmp_path / "child.yaml").write_text("base: parent.yaml\noptim:\n  lr: 2.0e-4\n")
    cfg = resolve(tmp_path / "child.yaml", ["train.batch_size=3"])
    assert (cfg.task, cfg.model.size, cfg.train.iterations, cfg.optim.lr, cfg.train.batch_size) == (
        "seg",
        "1b",
        1234,
        2e-4,
        3,
    )
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ntask: seg\n")
    with pytest.raises(ConfigError, match="chain loops"):
        resolve(tmp_path / "a.yaml")
    (tmp_path / "bad.yaml").write_text("task: seg\noptim:\n  lr: [1\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        resolve(tmp_path / "bad.yaml")
    (tmp_path / "typo.yaml").write_text("task: seg\noptim:\n  weight_decy: 0.1\n")
    with pytest.raises(
        ConfigError,
        match=r"typo.yaml: unknown config key 'optim.weight_decy' \(did you mean 'optim.weight_decay'\?\)",
    ):
        resolve(tmp_path / "typo.yaml")


@pytest.mark.parametrize("recipe", ["pose/tiny", "pointmap/5b", "seg/0.8b"])
def test_yaml_round_trip(tmp_path, recipe):
    cfg = resolve(recipe, ["data.train=[/x, {path: /y, subsample: 2}]", "output_dir=/out"])
    path = write_config(cfg, tmp_path / "run" / "config.yaml")
    assert resolve(path) == cfg
    assert path.read_text() == to_yaml(cfg)
    assert "input_size: [1024, 768]" in to_yaml(resolve("seg/1b"))
