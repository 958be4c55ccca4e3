"""Per-task configuration sections: augmentation pipeline and loss weights.

Every default is the value of the released fine-tuning configs (training spec §2, §1.7); the
augmentation classes are consumed by ``augment.py`` / ``pose_augment.py`` and the loss classes by
``losses.py`` / ``pointmap_loss.py``. ``TASK_SECTIONS`` maps a task name to its two section
classes; pretraining registers its pair (multi-crop views, objective) from ``pretrain/config.py``.

Probabilities are called ``p`` everywhere; ranges are ``[low, high]`` pairs sampled uniformly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from sapiens2_cli.pretrain.config import PretrainAugment, PretrainLoss

Range = tuple[float, float]


# --------------------------------------------------------------------------- shared op knobs
@dataclass
class Photometric:
    """Brightness / contrast / saturation / hue jitter; each sub-op runs with probability 0.5."""

    p: float = 1.0
    brightness: float = 32.0  # +- delta on the 0-255 scale
    contrast: Range = (0.5, 1.5)
    saturation: Range = (0.5, 1.5)
    hue: float = 18.0  # +- delta in OpenCV hue units (0-180)


@dataclass
class GaussianBlur:
    p: float = 0.3
    kernel: int = 3
    sigma: Range = (0.1, 2.0)


@dataclass
class GaussianNoise:
    p: float = 0.3
    variance: Range = (5.0, 20.0)  # on the 0-255 scale


@dataclass
class Solarize:
    p: float = 0.3
    threshold: int = 128


@dataclass
class DownUp:
    """Downsample by a random factor and upsample back, random interpolation each way."""

    p: float = 0.2
    factor: Range = (0.1, 0.7)


@dataclass
class RandomScale:
    p: float = 0.3
    factor: Range = (0.5, 2.0)


@dataclass
class RandomCrop:
    """Crop of random aspect (W/H) and area fraction; up to ``tries`` draws must fit the image."""

    p: float = 0.3
    aspect: Range = (0.5, 2.0)
    area: Range = (0.4, 1.0)
    tries: int = 8


@dataclass
class Flip:
    p: float = 0.5


@dataclass
class Rotate:
    p: float = 0.5
    max_degrees: float = 60.0


@dataclass
class KernelBlur:
    """Box or median blur with a random odd kernel size in ``[kernel[0], kernel[1]]``."""

    p: float = 0.1
    kernel: tuple[int, int] = (3, 7)


@dataclass
class CoarseDropout:
    """``holes`` rectangles filled with 0, each side a random fraction of the image side."""

    p: float = 1.0
    holes: int = 1
    size: Range = (0.2, 0.4)


# --------------------------------------------------------------------------- pose
@dataclass
class HalfBody:
    p: float = 0.3
    min_keypoints: int = 9  # visible keypoints needed to try
    upper_prob: float = 0.7
    min_upper: int = 2
    min_lower: int = 3
    padding: float = 1.5


@dataclass
class BoxJitter:
    """Random shift (p ``shift_p``), scale (always) and rotation (p ``rotate_p``) of the box.

    Each factor is ``truncated_normal(-1, 1)`` times the given amplitude.
    """

    shift_p: float = 0.3
    shift: float = 0.16  # fraction of the box size
    scale: float = 0.5  # factor 1 + scale * t
    rotate_p: float = 0.6
    rotate_degrees: float = 80.0


@dataclass
class PoseAugment:
    # training box: tight box of the visible keypoints (released recipe) or the annotation bbox
    bbox_source: Literal["keypoints", "annotation"] = "keypoints"
    bbox_padding: float = 1.25
    flip: Flip = field(default_factory=lambda: Flip(p=0.5))
    half_body: HalfBody = field(default_factory=HalfBody)
    box_jitter: BoxJitter = field(default_factory=BoxJitter)
    photometric: Photometric = field(default_factory=lambda: Photometric(p=0.8))
    blur: KernelBlur = field(default_factory=KernelBlur)
    median_blur: KernelBlur = field(default_factory=KernelBlur)
    coarse_dropout: CoarseDropout = field(default_factory=CoarseDropout)
    heatmap_stride: int = 4
    heatmap_sigma: float = 6.0  # heatmap pixels (6 at a 256 x 192 heatmap)
    min_visible: int = 8  # resample below this many visible keypoints at load
    min_visible_body: int = 6  # ... or below this many among the first 21 (308-point set only)
    min_visible_after: int = 3  # resample when fewer survive the pipeline
    reject_grayscale: bool = True


@dataclass
class PoseLoss:
    """Keypoint-weighted heatmap MSE."""

    weight: float = 10.0


# --------------------------------------------------------------------------- segmentation
@dataclass
class RandomBackground:
    """Replace background (label 0) with a random image from ``dir`` (off while ``dir`` is null)."""

    p: float = 0.8
    dir: str | None = None


@dataclass
class SegCrop:
    p: float = 0.3
    max_class_ratio: float = 0.75  # most frequent label must cover less than this
    tries: int = 10


@dataclass
class SegAugment:
    background: RandomBackground = field(default_factory=RandomBackground)
    resize_ratio: Range = (0.4, 2.0)
    crop: SegCrop = field(default_factory=SegCrop)
    blur: GaussianBlur = field(default_factory=GaussianBlur)
    noise: GaussianNoise = field(default_factory=GaussianNoise)
    rotate: Rotate = field(default_factory=Rotate)
    flip: Flip = field(default_factory=lambda: Flip(p=0.5))
    photometric: Photometric = field(default_factory=Photometric)
    min_foreground_pixels: int = 8  # at load
    min_foreground_fraction: float = 0.01  # after the pipeline


@dataclass
class SegLoss:
    """Class-weighted cross-entropy + Dice; ``class_weights`` null = the taxonomy's weights."""

    ce_weight: float = 1.0
    dice_weight: float = 1.0
    dice_eps: float = 1e-3
    class_weights: list[float] | None = None


# --------------------------------------------------------------------------- dense regression
@dataclass
class NormalAugment:
    photometric: Photometric = field(default_factory=Photometric)
    down_up: DownUp = field(default_factory=DownUp)
    scale: RandomScale = field(default_factory=RandomScale)
    crop: RandomCrop = field(default_factory=RandomCrop)
    flip: Flip = field(default_factory=lambda: Flip(p=0.3))
    blur: GaussianBlur = field(default_factory=GaussianBlur)
    noise: GaussianNoise = field(default_factory=GaussianNoise)
    solarize: Solarize = field(default_factory=Solarize)
    min_valid_pixels: int = 16
    max_valid_fraction: float = 0.96


@dataclass
class NormalLoss:
    cosine_weight: float = 10.0
    l1_weight: float = 1.0
    grad_weight: float = 10.0


@dataclass
class PointmapAugment:
    photometric: Photometric = field(default_factory=Photometric)
    scale: RandomScale = field(default_factory=RandomScale)
    crop: RandomCrop = field(default_factory=RandomCrop)
    flip: Flip = field(default_factory=lambda: Flip(p=0.3))
    canonical_focal: float = 768.0  # px at the network input; target scale s = f_c / f_x
    min_valid_pixels: int = 16
    max_valid_fraction: float = 0.96
    min_depth: float = 0.04  # canonical depth, metres


@dataclass
class PointmapLoss:
    """Seven weighted terms; ``clamp`` caps the three L1-type terms after weighting."""

    l1_weight: float = 2.0
    multiscale_weight: float = 1.0
    silog_weight: float = 1.0
    intrinsics_weight: float = 1.0
    shift_invariant_weight: float = 1.0
    normal_weight: float = 2.0
    scale_weight: float = 4.0
    clamp: float = 4.0


@dataclass
class AlbedoAugment:
    scale: RandomScale = field(default_factory=RandomScale)
    crop: RandomCrop = field(default_factory=RandomCrop)
    flip: Flip = field(default_factory=lambda: Flip(p=0.3))
    noise: GaussianNoise = field(default_factory=lambda: GaussianNoise(p=0.2))
    min_valid_pixels: int = 16
    max_valid_fraction: float = 0.96
    min_albedo_std: float = 0.02  # reject near-constant albedo (max channel std inside mask)


@dataclass
class AlbedoLoss:
    l1_weight: float = 2.0
    grad_weight: float = 2.0
    chroma_weight: float = 1.0


TASK_SECTIONS: dict[str, tuple[type, type]] = {
    "pose": (PoseAugment, PoseLoss),
    "seg": (SegAugment, SegLoss),
    "normal": (NormalAugment, NormalLoss),
    "pointmap": (PointmapAugment, PointmapLoss),
    "albedo": (AlbedoAugment, AlbedoLoss),
    "pretrain": (PretrainAugment, PretrainLoss),
}
