"""Typed defaults of a pretraining run, and the recipe files layered on top of them.

The defaults are the paper's recipe for the 1B model (spec/training.md §5.1, App. A.1) with
every number the paper leaves open filled in; each field says where its value comes from:
[P] paper, [D3] DINOv3 reference default (not confirmed for Sapiens2), [I] our choice, with
the reason. A recipe (``recipes/pretrain/<name>.yaml``) only states what differs for its size.
Unknown keys are errors that suggest the closest known key.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from sapiens2_cli.models.arch import ARCHS, BackboneArch, make_arch


@dataclasses.dataclass
class ModelSection:
    """The backbone: a released size, or ``custom`` with explicit widths (tiny test models)."""

    arch: str = "1b"  # a key of models.arch.ARCHS, or "custom"
    embed_dims: int = 0  # custom only
    num_layers: int = 0  # custom only
    num_heads: int = 0  # custom only
    n_storage_tokens: int = 8  # custom only; the release uses 8 [P]
    patch_size: int = 16  # custom only; the release uses 16 [P]
    use_tokenizer: bool = False  # custom only
    num_tokenizer_layers: int = 0  # custom only
    grad_checkpointing: bool = False  # recompute the student's block activations in backward
    layer_scale_init: float = 1e-4  # [I] the attention LayerScale's module default (release code)

    def build_arch(self) -> BackboneArch:
        if self.arch != "custom":
            if self.arch not in ARCHS:
                raise ValueError(f"model.arch: unknown size {self.arch!r}; choose from {', '.join(ARCHS)} or custom")
            return ARCHS[self.arch]
        if min(self.embed_dims, self.num_layers, self.num_heads) <= 0:
            raise ValueError("model.arch=custom needs embed_dims, num_layers and num_heads > 0")
        arch = make_arch(
            self.embed_dims,
            self.num_layers,
            self.num_heads,
            use_tokenizer=self.use_tokenizer,
            num_tokenizer_layers=self.num_tokenizer_layers,
        )
        return dataclasses.replace(arch, n_storage_tokens=self.n_storage_tokens, patch_size=self.patch_size)


@dataclasses.dataclass
class CropSection:
    """Multi-crop views (``augment.MultiCrop``). Sizes are ``[H, W]`` pixels."""

    global_size: tuple[int, int] = (1024, 768)  # [P] native resolution of the 1K models
    # [I] the paper gives no local size: DINO's 96/224 ratio (0.4375) on 1024x768.
    local_size: tuple[int, int] = (448, 336)
    num_local: int = 4  # [P]
    global_scale: tuple[float, float] = (0.5, 1.0)  # [P] area fraction
    local_scale: tuple[float, float] = (0.2, 0.7)  # [P]
    flip_prob: float = 0.5  # [P] flips on every view (kept on the global views [I])
    # Local views only ([P]: no colour augmentation on the global views, they feed the
    # reconstruction). Probabilities and strengths are DINO's [D3].
    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_prob: float = 0.2
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_prob: float = 0.2


@dataclasses.dataclass
class MaskingSection:
    ratio: float = 0.75  # [P]
    block_prob: float = 0.4  # [P] per sample [I]
    min_block_patches: int = 4  # [I] BEiT's block sampler minimum
    block_aspect: float = 0.3  # [I] BEiT: aspect ratio in [0.3, 1/0.3]


@dataclasses.dataclass
class DecoderSection:
    dims: int = 512  # [P]
    layers: int = 8  # [P]
    heads: int = 16  # [I] MAE's decoder (and Sapiens v1)
    # Reconstruct the input downsampled by this factor: 1 for the 1K models (16x16-px patches),
    # 2 for the 4K model, whose 64x64-px cells are reconstructed at 2K ([P] "2K output
    # resolution"; [I] 32x32x3 = 3072 values per cell instead of 12288).
    target_downsample: int = 1
    norm_pix_eps: float = 1e-6  # [P] MAE norm-pix


@dataclasses.dataclass
class DinoSection:
    prototypes: int = 65536  # [D3] (the paper does not give K)
    hidden_dims: int = 2048  # [D3]
    bottleneck_dims: int = 256  # [D3]
    student_temp: float = 0.1  # [P]
    teacher_temp_start: float = 0.065  # [P]
    teacher_temp: float = 0.07  # [P]
    teacher_temp_warmup_iters: int = 1000  # [P]
    center_momentum: float = 0.9  # [P]
    momentum_start: float = 0.992  # [P]
    momentum_end: float = 1.0  # [D3] cosine ramp to 1


@dataclasses.dataclass
class LossSection:
    mae: float = 1.0  # [P]
    dino: float = 0.4  # [P]
    koleo: float = 0.04  # [P]


@dataclasses.dataclass
class OptimSection:
    lr: float = 1e-4  # [P] (stated for 1B; used for every size [I])
    min_lr: float = 1e-7  # [P] cosine floor
    betas: tuple[float, float] = (0.9, 0.95)  # [P]
    weight_decay: float = 0.05  # [P]; 0 for norms, biases, LayerScale, position and special tokens
    warmup_iters: int = 1000  # [P]
    iters: int = 500_000  # [P]
    clip_grad: float = 5.0  # [P] global L2 norm
    precision: Literal["bf16", "fp32"] = "bf16"  # [P] bf16 autocast


@dataclasses.dataclass
class DataSection:
    batch_size: int = 8  # per rank; [I] the paper gives no batch size
    num_workers: int = 8
    shuffle_window: int = 1024  # [I] samples shuffled together (see data.py)
    log_every: int = 1


@dataclasses.dataclass
class PretrainConfig:
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    crops: CropSection = dataclasses.field(default_factory=CropSection)
    masking: MaskingSection = dataclasses.field(default_factory=MaskingSection)
    decoder: DecoderSection = dataclasses.field(default_factory=DecoderSection)
    dino: DinoSection = dataclasses.field(default_factory=DinoSection)
    loss: LossSection = dataclasses.field(default_factory=LossSection)
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, where: str = "config") -> PretrainConfig:
        return _build(cls, d, where)

    def validate(self) -> None:
        """Errors for combinations that cannot run (sizes not tiling the patch grid...)."""
        arch = self.model.build_arch()
        for name in ("global_size", "local_size"):
            size = getattr(self.crops, name)
            if size[0] % arch.stride or size[1] % arch.stride:
                raise ValueError(f"crops.{name} {list(size)} must be a multiple of {arch.stride} px")
        if arch.stride % self.decoder.target_downsample:
            raise ValueError(
                f"decoder.target_downsample {self.decoder.target_downsample} must divide the "
                f"{arch.stride}-px cell"
            )
        if not 0.0 < self.masking.ratio < 1.0:
            raise ValueError(f"masking.ratio must be in (0, 1), got {self.masking.ratio}")
        if self.data.batch_size < 2:
            raise ValueError("data.batch_size must be >= 2 (KoLeo needs neighbours in the batch)")


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, tuple | list):
        return [_plain(v) for v in x]
    return x


def _build(cls: type, d: Mapping[str, Any], where: str) -> Any:
    if not isinstance(d, Mapping):
        raise TypeError(f"{where}: expected a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in d.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(names)}"
            raise ValueError(f"{where}: unknown key {key!r}{hint}")
        kwargs[key] = _coerce(hints[key], value, f"{where}.{key}")
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    origin = typing.get_origin(hint)
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ValueError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, where) for a, v in zip(args, value, strict=True))
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ValueError(f"{where}: {value!r} is not one of {list(typing.get_args(hint))}")
        return value
    if origin in (typing.Union, types.UnionType):
        return value
    if hint is float and not isinstance(value, bool):
        try:  # YAML 1.1 reads ``1e-4`` (no dot) as a string
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected a number, got {value!r}") from None
    if hint in (int, bool, str) and type(value) is not hint:
        raise ValueError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def recipe_path(name: str) -> Path:
    """``recipes/pretrain/<name>.yaml`` inside the package, or ``name`` itself when it is a file."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such recipe file")
        return path
    root = resources.files("sapiens2_cli") / "recipes" / "pretrain"
    candidate = Path(str(root / f"{name}.yaml"))
    if not candidate.is_file():
        known = sorted(p.stem for p in Path(str(root)).glob("*.yaml"))
        raise FileNotFoundError(f"no pretrain recipe {name!r}; known: {', '.join(known)}")
    return candidate


def load_recipe(name: str) -> PretrainConfig:
    """Typed defaults overlaid with a recipe file (packaged name such as ``tiny``, or a path)."""
    path = recipe_path(name)
    data = yaml.safe_load(path.read_text()) or {}
    cfg = PretrainConfig.from_dict(data, where=str(path))
    cfg.validate()
    return cfg
