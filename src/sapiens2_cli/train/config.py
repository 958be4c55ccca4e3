"""Training configuration: typed defaults, recipe YAML on top, ``key=value`` overrides on top.

The one home of every training knob. ``resolve(recipe, overrides)`` builds a :class:`Config`:

1. the typed defaults below (common sections) plus the task's augmentation and loss sections
   (``task_config.TASK_SECTIONS``), chosen by the ``task`` key of the recipe chain or overrides;
2. each recipe of the ``base:`` chain, oldest first, then the recipe itself — a recipe is a
   small YAML mapping that states only what differs;
3. command-line overrides ``a.b.c=value`` (value parsed as YAML: ``3``, ``1e-4``, ``[64, 48]``,
   ``{embed_dims: 64}``, ``null``).

Unknown keys fail with a close-match suggestion and wrong types name the key and the expected
type (``typed_merge``). A recipe is named ``<task>/<size>`` (``seg/1b`` ->
``sapiens2_cli/recipes/seg/1b.yaml``) or given as a path to a ``.yaml`` file.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from sapiens2_cli.train.task_config import TASK_SECTIONS
from sapiens2_cli.train.typed_merge import ConfigError, apply, to_plain

__all__ = [
    "Config",
    "ConfigError",
    "RECIPES_DIR",
    "available_recipes",
    "parse_overrides",
    "recipe_path",
    "resolve",
    "to_yaml",
    "write_config",
]

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"

Task = Literal["pose", "seg", "normal", "pointmap", "albedo", "pretrain"]
Size = Literal["0.1b", "0.4b", "0.8b", "1b", "5b", "1b-4k"]


@dataclass
class ArchConfig:
    """Backbone shape override for tiny or custom models; null = the value of ``model.size``."""

    embed_dims: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    ffn: int | None = None  # SwiGLU hidden width
    patch_size: int | None = None  # input pixels per patch side (16 in every release)
    n_storage_tokens: int | None = None  # extra prefix tokens (8 in every release)


@dataclass
class HeadConfig:
    """Decode-head width override; null = the released widths for ``model.size``.

    Which lists a task reads: seg ``deconv_channels`` (4) + ``conv_channels`` (2); pose
    ``deconv_channels`` (2) + ``conv_channels`` (3); normal / albedo ``upsample_channels`` (4) +
    ``conv_channels`` (3); pointmap those two + ``scale_conv_channels`` (3) and
    ``scale_mlp_channels`` (hidden widths of the scale MLP, 2).
    """

    deconv_channels: list[int] | None = None
    conv_channels: list[int] | None = None
    upsample_channels: list[int] | None = None
    scale_conv_channels: list[int] | None = None
    scale_mlp_channels: list[int] | None = None


@dataclass
class ModelConfig:
    size: Size = "1b"
    arch: ArchConfig = field(default_factory=ArchConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    input_size: tuple[int, int] = (1024, 768)  # network input H, W in pixels
    # backbone initialisation: "pretrain" = the released pretrained backbone of `size`, or a
    # Hub repo / local file; null = random initialisation
    init: str | None = "pretrain"
    # whole-model weights (weights only, tensors whose shape differs are skipped); null = none
    load_from: str | None = None
    # LayerScale weights of a random initialisation; null = the module's 1e-4
    layer_scale_init: float | None = None


@dataclass
class DatasetSpec:
    """One training / validation folder; ``repeat`` over-samples, ``subsample`` thins (1 of k)."""

    path: str = ""
    repeat: int = 1
    subsample: int = 1

    @classmethod
    def from_yaml(cls, value: Any, where: str) -> DatasetSpec:
        if isinstance(value, str):
            return cls(path=value)
        raise ConfigError(f"config key {where!r} expects a folder path or a mapping, got {value!r}")


@dataclass
class DataConfig:
    train: list[DatasetSpec] = field(default_factory=list)
    val: list[DatasetSpec] = field(default_factory=list)
    num_workers: int = 4
    max_retries: int = 1000  # redraws of a random other sample when one is rejected
    class_map: str | None = None  # seg: JSON with a label remap and optionally a class list
    albedo_exr_linear: bool = True  # albedo: EXR targets are linear RGB (converted to sRGB)
    shuffle_window: int = 1024  # pretrain: stream items shuffled together (pretrain/data.py)


@dataclass
class OptimConfig:
    """AdamW; no decay for 1-D tensors, biases and ``pos_embed`` (see ``optim.py``)."""

    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.1
    layer_decay: float | None = 0.9  # layer-wise LR decay rate r; null = off


@dataclass
class ScheduleConfig:
    """Linear warm-up from ``warmup_start_factor`` then linear or cosine decay to ``final_lr``."""

    warmup_iters: int = 500
    warmup_start_factor: float = 1e-3
    decay: Literal["linear", "cosine"] = "linear"
    final_lr: float = 0.0


@dataclass
class TrainConfig:
    iterations: int = 20000  # optimizer steps
    batch_size: int = 8  # per device
    grad_accum: int = 1
    clip_grad: float | None = 4.0  # global L2 norm; null = no clipping
    precision: Literal["fp32", "bf16"] = "bf16"
    activation_checkpointing: bool = False
    distributed: Literal["ddp", "fsdp"] = "fsdp"
    compile: bool = False
    seed: int = 0
    log_interval: int = 10


@dataclass
class EvalConfig:
    interval: int = 1000  # iterations; 0 = only at the end
    batch_size: int = 1
    flip_test: bool = True  # pose
    max_samples: int | None = None


@dataclass
class CheckpointConfig:
    interval: int = 1000
    keep: int | None = None  # newest checkpoints kept; null = all
    # true: each rank writes its own shards (torch.distributed.checkpoint) into one folder per
    # checkpoint, for FSDP2 runs too large to gather on one host; needs a file system every
    # rank sees. false: one file with the full state, written by rank 0.
    sharded: bool = False


@dataclass
class Config:
    task: Task
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    augment: Any = None  # the task's augmentation section (task_config.py)
    loss: Any = None  # the task's loss section (task_config.py)
    output_dir: str | None = None


def default_config(task: str) -> Config:
    """The typed defaults for ``task``, before any recipe."""
    if task not in TASK_SECTIONS:
        close = difflib.get_close_matches(str(task), list(TASK_SECTIONS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown task {task!r}{hint}; tasks: {', '.join(TASK_SECTIONS)}")
    augment_cls, loss_cls = TASK_SECTIONS[task]
    return Config(task=task, augment=augment_cls(), loss=loss_cls())


def resolve(recipe: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Build the configuration from a recipe (name or path; None = defaults) and overrides."""
    layers = _recipe_chain(recipe) if recipe is not None else []
    layers.append(("command line", parse_overrides(overrides)))
    task = None
    for _, layer in layers:
        task = layer.get("task", task)
    if task is None:
        raise ConfigError("no task given: set `task:` in the recipe or pass task=<name>")
    cfg = default_config(task)
    for source, layer in layers:
        try:
            cfg = _apply_layer(cfg, layer)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None
    validate(cfg)
    return cfg


def _apply_layer(cfg: Config, layer: dict[str, Any]) -> Config:
    task_sections = {k: layer[k] for k in ("augment", "loss") if k in layer}
    rest = {k: v for k, v in layer.items() if k not in task_sections and k != "task"}
    cfg = apply(cfg, rest)
    for key, value in task_sections.items():
        cfg = dataclasses.replace(cfg, **{key: apply(getattr(cfg, key), value, key)})
    return cfg


def validate(cfg: Config) -> None:
    """Checks that span keys or ranges; raises :class:`ConfigError` naming the key."""
    h, w = cfg.model.input_size
    if h <= 0 or w <= 0 or h % 16 or w % 16:
        raise ConfigError(f"model.input_size must be positive multiples of 16, got {[h, w]}")
    positive = {
        "train.iterations": cfg.train.iterations,
        "train.batch_size": cfg.train.batch_size,
        "train.grad_accum": cfg.train.grad_accum,
        "train.log_interval": cfg.train.log_interval,
        "eval.batch_size": cfg.eval.batch_size,
        "optim.lr": cfg.optim.lr,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be > 0, got {value}")
    if cfg.checkpoint.keep is not None and cfg.checkpoint.keep < 1:
        raise ConfigError(f"checkpoint.keep must be >= 1 or null, got {cfg.checkpoint.keep}")
    if cfg.checkpoint.interval < 1:
        raise ConfigError(f"checkpoint.interval must be >= 1, got {cfg.checkpoint.interval}")
    if cfg.optim.layer_decay is not None and not 0 < cfg.optim.layer_decay <= 1:
        raise ConfigError(f"optim.layer_decay must be in (0, 1], got {cfg.optim.layer_decay}")
    if not 0 <= cfg.schedule.warmup_iters < cfg.train.iterations:
        raise ConfigError(
            f"schedule.warmup_iters ({cfg.schedule.warmup_iters}) must be in "
            f"[0, train.iterations = {cfg.train.iterations})"
        )
    for key, spec in [(f"data.train[{i}]", d) for i, d in enumerate(cfg.data.train)] + [
        (f"data.val[{i}]", d) for i, d in enumerate(cfg.data.val)
    ]:
        if not spec.path or spec.repeat < 1 or spec.subsample < 1:
            raise ConfigError(f"{key} needs a path and repeat, subsample >= 1, got {spec}")
    _check_ranges(cfg.augment, "augment")


def _check_ranges(section: Any, where: str) -> None:
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        key = f"{where}.{f.name}"
        if dataclasses.is_dataclass(value):
            _check_ranges(value, key)
        elif f.name == "p" and not 0.0 <= value <= 1.0:
            raise ConfigError(f"{key} is a probability and must be in [0, 1], got {value}")
        elif (
            isinstance(value, tuple)
            and len(value) == 2
            and not f.name.endswith("size")  # sizes are [H, W] pairs, not ranges
            and value[0] > value[1]
        ):
            raise ConfigError(f"{key} is a [low, high] range, got {list(value)}")


# --------------------------------------------------------------------------- recipes
def available_recipes() -> list[str]:
    """Names of the recipes shipped with the package (``<task>/<size>``, pretraining included), sorted."""
    return sorted(
        p.relative_to(RECIPES_DIR).with_suffix("").as_posix()
        for p in RECIPES_DIR.rglob("*.yaml")
        if not p.name.startswith("_")
    )


def recipe_path(recipe: str | Path, *, relative_to: Path | None = None) -> Path:
    """A recipe name (``seg/1b``, also ``seg/_base``) or a ``.yaml`` path -> an existing file."""
    text = str(recipe)
    if text.endswith((".yaml", ".yml")) or isinstance(recipe, Path):
        path = Path(recipe)
        if not path.is_absolute() and relative_to is not None:
            path = relative_to / path
        if not path.is_file():
            raise ConfigError(f"recipe file {path} does not exist")
        return path
    path = RECIPES_DIR / f"{text}.yaml"
    if path.is_file():
        return path
    close = difflib.get_close_matches(text, available_recipes(), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(f"no recipe named {text!r}{hint} (names are <task>/<size>, or a .yaml path)")


def _recipe_chain(recipe: str | Path) -> list[tuple[str, dict[str, Any]]]:
    chain: list[tuple[str, dict[str, Any]]] = []
    seen: list[Path] = []
    path = recipe_path(recipe)
    while True:
        resolved = path.resolve()
        if resolved in seen:
            raise ConfigError(f"recipe {path}: `base:` chain loops ({' -> '.join(map(str, seen))})")
        seen.append(resolved)
        layer = _load_yaml(path)
        base = layer.pop("base", None)
        chain.append((str(path), layer))
        if base is None:
            break
        if not isinstance(base, str):
            raise ConfigError(f"recipe {path}: `base:` must be a recipe name or path, got {base!r}")
        path = recipe_path(base, relative_to=path.parent)
    return chain[::-1]


def _load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"recipe {path} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of keys, got {type(data).__name__}")
    return data


_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["optim.lr=1e-4", "model.input_size=[64, 48]"]`` -> nested mapping, later wins."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not _KEY.match(key):
            raise ConfigError(f"override {item!r} must look like dotted.key=value")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({err})") from None
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        if isinstance(value, dict) and isinstance(node.get(leaf), dict):
            node[leaf].update(value)
        else:
            node[leaf] = value
    return tree


class _Dumper(yaml.SafeDumper):
    """Block-style mappings, flow-style lists of scalars (``input_size: [1024, 768]``)."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(not isinstance(v, dict | list) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def to_yaml(cfg: Config) -> str:
    """The full resolved configuration as YAML (loadable again as a recipe)."""
    return yaml.dump(to_plain(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def write_config(cfg: Config, path: str | Path) -> Path:
    """Write ``to_yaml(cfg)`` atomically (temporary file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(to_yaml(cfg))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
