"""The pretraining task's configuration sections, and the checks that span keys.

A pretraining run is configured by the shared system (``train/config.py``: typed defaults,
recipe YAML, ``key=value`` overrides with close-match errors) with ``task: pretrain``. The
common sections mean what they mean for fine-tuning (``model.size`` / ``model.arch`` pick the
backbone, ``model.input_size`` is the global-crop size, ``optim`` is AdamW, ``schedule`` the
warm-up + cosine LR, ``train`` the loop, ``checkpoint`` the checkpoints); the two task
sections defined here are registered in ``task_config.TASK_SECTIONS``:

* ``augment`` (:class:`PretrainAugment`): the multi-crop views and the masks;
* ``loss`` (:class:`PretrainLoss`): the objective, one sub-section per term with its weight
  and the head it trains (MAE decoder, DINO head with its teacher, KoLeo).

The paper's values for the shared sections (1B recipe, spec/training.md §5.1, App. A.1) are in
``recipes/pretrain/_base.yaml``; each size's recipe states only what differs. Each default is
tagged: [P] paper, [D3] DINOv3 reference default (not confirmed for Sapiens2), [I] our choice,
with the reason.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sapiens2_cli.train.typed_merge import ConfigError

if TYPE_CHECKING:
    from sapiens2_cli.models.arch import BackboneArch
    from sapiens2_cli.train.config import Config

__all__ = ["DINOTerm", "KoLeoTerm", "MAETerm", "Masking", "PretrainAugment", "PretrainLoss", "check"]

Range = tuple[float, float]


@dataclass
class Masking:
    """Cells of each global view hidden from the student (``masking.sample_masks``)."""

    ratio: float = 0.75  # [P]
    block_prob: float = 0.4  # [P]; drawn per sample [I]
    min_block_patches: int = 4  # [I] BEiT's block sampler minimum
    block_aspect: float = 0.3  # [I] BEiT: aspect ratio in [0.3, 1/0.3]


@dataclass
class PretrainAugment:
    """Multi-crop views (``augment.MultiCrop``): 2 global crops of ``model.input_size`` and
    ``num_local`` local crops of ``local_size``; sizes ``[H, W]`` pixels, scales area fractions.

    Colour augmentation acts on the local views only ([P]: the global views feed the
    reconstruction); its probabilities and strengths are DINO's [D3].
    """

    # [I] the paper gives no local size: DINO's 96/224 ratio (0.4375) on 1024x768.
    local_size: tuple[int, int] = (448, 336)
    num_local: int = 4  # [P]
    global_scale: Range = (0.5, 1.0)  # [P]
    local_scale: Range = (0.2, 0.7)  # [P]
    flip_prob: float = 0.5  # [P] flips on every view (kept on the global views [I])
    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1  # turns
    grayscale_prob: float = 0.2
    blur_prob: float = 0.5
    blur_sigma: Range = (0.1, 2.0)  # pixels
    solarize_prob: float = 0.2
    masking: Masking = field(default_factory=Masking)


@dataclass
class MAETerm:
    """Masked reconstruction (norm-pix MSE) through an MAE decoder."""

    weight: float = 1.0  # [P]
    decoder_dims: int = 512  # [P]
    decoder_layers: int = 8  # [P]
    decoder_heads: int = 16  # [I] MAE's decoder (and Sapiens v1)
    # Reconstruct the input downsampled by this factor: 1 for the 1K models (16x16-px cells),
    # 2 for the 4K model, whose 64x64-px cells are reconstructed at 2K ([P] "2K output
    # resolution"; [I] 32x32x3 = 3072 values per cell instead of 12288).
    target_downsample: int = 1
    norm_pix_eps: float = 1e-6  # [P] MAE norm-pix


@dataclass
class DINOTerm:
    """Self-distillation from the EMA teacher through a prototype head."""

    weight: float = 0.4  # [P]
    prototypes: int = 65536  # [D3] (the paper does not give K)
    hidden_dims: int = 2048  # [D3]
    bottleneck_dims: int = 256  # [D3]
    student_temp: float = 0.1  # [P]
    teacher_temp_start: float = 0.065  # [P]
    teacher_temp: float = 0.07  # [P]
    teacher_temp_warmup_iters: int = 1000  # [P]
    center_momentum: float = 0.9  # [P]
    momentum_start: float = 0.992  # [P] teacher EMA momentum at step 0
    momentum_end: float = 1.0  # [D3] cosine ramp to 1 at train.iterations


@dataclass
class KoLeoTerm:
    """The KoLeo spreading regulariser on the student's global ``[cls]`` tokens."""

    weight: float = 0.04  # [P]


@dataclass
class PretrainLoss:
    """``L = mae.weight * L_MAE + dino.weight * L_DINO + koleo.weight * L_KoLeo``."""

    mae: MAETerm = field(default_factory=MAETerm)
    dino: DINOTerm = field(default_factory=DINOTerm)
    koleo: KoLeoTerm = field(default_factory=KoLeoTerm)


def check(cfg: Config, arch: BackboneArch) -> None:
    """Errors for a pretraining configuration that cannot run, naming the key.

    ``arch`` is the backbone ``cfg.model`` describes (``model_setup.run_arch``).

    Raises:
        ConfigError: sizes that do not tile the cell grid, a ratio out of range, a key that
            pretraining does not read set to something it would ignore.
    """
    if cfg.task != "pretrain":
        raise ConfigError(f"a {cfg.task} recipe: fine-tune with `sapiens2 finetune`")
    aug, mae = cfg.augment, cfg.loss.mae
    for key, size in (("model.input_size", cfg.model.input_size), ("augment.local_size", aug.local_size)):
        if size[0] <= 0 or size[1] <= 0 or size[0] % arch.stride or size[1] % arch.stride:
            raise ConfigError(f"{key} {list(size)} must be positive multiples of the {arch.stride}-px cell")
    if mae.target_downsample < 1 or arch.stride % mae.target_downsample:
        raise ConfigError(
            f"loss.mae.target_downsample {mae.target_downsample} must divide the {arch.stride}-px cell"
        )
    if not 0.0 < aug.masking.ratio < 1.0:
        raise ConfigError(f"augment.masking.ratio must be in (0, 1), got {aug.masking.ratio}")
    if cfg.train.batch_size < 2:
        raise ConfigError("train.batch_size must be >= 2 (KoLeo needs neighbours in the batch)")
    if cfg.optim.layer_decay is not None:
        raise ConfigError("optim.layer_decay must be null: pretraining trains every layer at one rate")
    if len(cfg.data.train) > 1 or any(d.repeat != 1 or d.subsample != 1 for d in cfg.data.train):
        raise ConfigError("data.train: pretraining streams one folder (of images or .tar shards), as is")
    unused = {
        "data.val": cfg.data.val,
        "model.load_from": cfg.model.load_from,
        "model.head": [k for k, v in dataclasses.asdict(cfg.model.head).items() if v is not None],
    }
    for key, value in unused.items():
        if value:
            raise ConfigError(f"{key} is not used by pretraining; leave it unset")
