"""Folder datasets for fine-tuning and evaluation, and their mixture.

Folder layouts (``<name>`` = image file stem, images in any of ``files.IMAGE_EXTENSIONS``):

* seg: ``DIR/images/<name>.*`` + ``DIR/labels/<name>.png`` (``seg_dataset.py``)
* pose: ``DIR/images/`` + ``DIR/annotations.json`` (COCO keypoints, ``pose_dataset.py``)
* normal: ``DIR/images/`` + ``DIR/normals/<name>.{npy,npz,exr,png}`` (unit camera-frame vectors,
  x right; PNG decoded as 2c - 1) + optional ``DIR/masks/<name>.{png,jpg,npy}``
* albedo: ``DIR/images/`` + ``DIR/albedo/<name>.{png,exr,npy}`` (sRGB in [0, 1]; EXR linear
  unless ``data.albedo_exr_linear`` is false) + optional masks
* pointmap: ``DIR/images/`` + ``DIR/pointmaps/<name>.{npy,exr}`` (``H x W`` depth or
  ``H x W x 3`` camera-frame XYZ of which Z is used, metres) + ``DIR/intrinsics/<name>.{json,txt}``
  (K in pixels of that image) + optional masks

Each folder dataset exposes ``len()`` and ``sample(index, rng, train=...) -> dict | None``
(None = rejected by the released recipe's rules). :class:`Mixture` concatenates folders with
``repeat`` / ``subsample``, seeds one ``numpy`` generator per draw from ``(seed, draw)`` and
redraws a random other index on rejection. Samples are dicts of tensors (see each class).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from sapiens2_cli.train import pipelines
from sapiens2_cli.train.augment import DenseSample
from sapiens2_cli.train.files import (
    DataError,
    find_target,
    list_images,
    read_float_map,
    read_image,
    read_intrinsics,
    read_mask,
    require_targets,
)

__all__ = [
    "IMAGE_MEAN",
    "IMAGE_STD",
    "DataError",
    "DenseFolder",
    "Mixture",
    "build_dataset",
    "collate",
    "to_model_input",
]

IMAGE_MEAN = (123.675, 116.28, 103.53)  # RGB, 0-255 scale
IMAGE_STD = (58.395, 57.12, 57.375)
MASK_EXTENSIONS = (".png", ".jpg", ".jpeg", ".npy")


def to_model_input(image_bgr: np.ndarray) -> torch.Tensor:
    """uint8 BGR ``[H, W, 3]`` -> float32 RGB ``[3, H, W]``, ``(x - mean) / std`` (0-255 scale)."""
    rgb = torch.from_numpy(np.ascontiguousarray(image_bgr[..., ::-1])).permute(2, 0, 1).float()
    mean = torch.tensor(IMAGE_MEAN).reshape(3, 1, 1)
    std = torch.tensor(IMAGE_STD).reshape(3, 1, 1)
    return (rgb - mean) / std


def _chw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1), dtype=np.float32))


def _srgb_from_linear(linear: np.ndarray) -> np.ndarray:
    linear = np.clip(linear, 0.0, None)
    return np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * np.power(linear, 1 / 2.4) - 0.055)


class DenseFolder:
    """Normal, albedo or pointmap folder (layout in the module docstring).

    Samples: ``image [3, H, W]``, ``mask [h, w] bool``, ``pad [4] int64`` (left, right, top,
    bottom at input resolution), ``name``; plus per task
    normal ``normal [3, h, w]`` (unit, 0 where invalid); albedo ``albedo [3, h, w]`` (sRGB);
    pointmap ``pointmap [3, H, W]`` (canonical XYZ), ``scale`` (f_c / f_x), ``intrinsics
    [3, 3]`` (at input resolution), ``mean_depth``. Training targets are at input resolution
    ``(H, W)``; validation normal / albedo targets stay at the source resolution ``(h, w)``.
    """

    TARGETS = {
        "normal": ("normals", (".npy", ".npz", ".exr", ".png")),
        "albedo": ("albedo", (".png", ".exr", ".npy")),
        "pointmap": ("pointmaps", (".npy", ".exr")),
    }

    def __init__(
        self,
        root: str | Path,
        *,
        task: Literal["normal", "albedo", "pointmap"],
        augment: Any,
        input_size: tuple[int, int],
        albedo_exr_linear: bool = True,
    ) -> None:
        self.root, self.task, self.augment = Path(root), task, augment
        self.input_size, self.albedo_exr_linear = tuple(input_size), albedo_exr_linear
        folder, extensions = self.TARGETS[task]
        self.images = list_images(self.root / "images")
        self.targets = [find_target(self.root / folder, p.stem, extensions) for p in self.images]
        require_targets(self.root / folder, self.images, self.targets, extensions)
        self.masks: list[Path | None] = [None] * len(self.images)
        if (self.root / "masks").is_dir():
            self.masks = [
                find_target(self.root / "masks", p.stem, MASK_EXTENSIONS) for p in self.images
            ]
            require_targets(self.root / "masks", self.images, self.masks, MASK_EXTENSIONS)
        self.intrinsics: list[Path | None] = [None] * len(self.images)
        if task == "pointmap":
            self.intrinsics = [
                find_target(self.root / "intrinsics", p.stem, (".json", ".txt"))
                for p in self.images
            ]
            require_targets(
                self.root / "intrinsics", self.images, self.intrinsics, (".json", ".txt")
            )

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> DenseSample:
        """The sample at source resolution: image, target map, ``mask`` (uint8) and K."""
        image_path, target_path, mask_path = (
            self.images[index],
            self.targets[index],
            self.masks[index],
        )
        image = read_image(image_path)
        target = read_float_map(target_path, npz_key="normal")
        h, w = image.shape[:2]
        if target.shape[:2] != (h, w):
            raise DataError(
                f"{target_path}: size {target.shape[1]}x{target.shape[0]} differs from image "
                f"{image_path.name} ({w}x{h})"
            )
        mask = np.ones((h, w), dtype=bool) if mask_path is None else read_mask(mask_path)
        if mask.shape != (h, w):
            raise DataError(
                f"{mask_path}: size {mask.shape[1]}x{mask.shape[0]} differs from image "
                f"{image_path.name} ({w}x{h})"
            )
        maps: dict[str, np.ndarray]
        if self.task == "pointmap":
            if target.ndim == 3 and target.shape[2] == 3:
                target = target[..., 2]
            elif target.ndim != 2:
                raise DataError(
                    f"{target_path}: pointmap must be H x W depth or H x W x 3 XYZ, "
                    f"got {target.shape}"
                )
            valid = mask & np.isfinite(target) & (target > 0)
            maps = {
                "depth": np.where(valid, target, 0).astype(np.float32),
                "mask": valid.astype(np.uint8),
            }
            return DenseSample(
                image=image, maps=maps, intrinsics=read_intrinsics(self.intrinsics[index])
            )
        if target.ndim != 3 or target.shape[2] != 3:
            raise DataError(
                f"{target_path}: {self.task} map must be H x W x 3, got shape {target.shape}"
            )
        if self.task == "normal":
            if target_path.suffix.lower() == ".png":
                target = 2 * target - 1
            norm = np.linalg.norm(target, axis=-1)
            valid = mask & np.isfinite(target).all(-1) & (norm > 1e-6)
            target = np.where(valid[..., None], target / np.where(valid, norm, 1)[..., None], 0)
        else:
            if target_path.suffix.lower() == ".exr" and self.albedo_exr_linear:
                target = _srgb_from_linear(target)
            valid = mask & np.isfinite(target).all(-1)
            target = np.where(valid[..., None], target, 0)
        maps = {self.task: target.astype(np.float32), "mask": valid.astype(np.uint8)}
        return DenseSample(image=image, maps=maps)

    def _accept_at_load(self, sample: DenseSample) -> bool:
        valid = sample.maps["mask"] > 0
        if valid.sum() < self.augment.min_valid_pixels:
            return False
        if self.task == "albedo":
            return float(sample.maps["albedo"][valid].std(0).max()) >= self.augment.min_albedo_std
        return True

    def sample(self, index: int, rng: np.random.Generator, *, train: bool) -> dict[str, Any] | None:
        sample = self.load(index)
        name = self.images[index].stem
        if train:
            if not self._accept_at_load(sample):
                return None
            cfg = self.augment
            if self.masks[index] is None:  # without a mask every pixel is valid: no upper bound
                cfg = replace(cfg, max_valid_fraction=1.0)
            sample = getattr(pipelines, f"{self.task}_train")(sample, rng, cfg, self.input_size)
            if sample is None:
                return None
        elif self.task == "pointmap":
            sample = pipelines.pointmap_val(sample, self.input_size)
        else:
            sample = pipelines.dense_val(sample, self.input_size)
        out: dict[str, Any] = {
            "image": to_model_input(sample.image),
            "pad": torch.tensor(sample.pad, dtype=torch.int64),
            "name": name,
        }
        if self.task == "pointmap":
            points, valid, scale, mean_depth = pipelines.pointmap_target(
                sample.maps["depth"],
                sample.maps["mask"],
                sample.intrinsics,
                canonical_focal=self.augment.canonical_focal,
            )
            out.update(
                pointmap=_chw(points),
                mask=torch.from_numpy(valid),
                scale=torch.tensor(scale, dtype=torch.float32),
                intrinsics=torch.from_numpy(sample.intrinsics.astype(np.float32)),
                mean_depth=torch.tensor(mean_depth, dtype=torch.float32),
            )
        else:
            out[self.task] = _chw(sample.maps[self.task])
            out["mask"] = torch.from_numpy(sample.maps["mask"] > 0)
        return out


class Mixture(torch.utils.data.Dataset):
    """Concatenated folder datasets with over-sampling and thinning (training spec §1.7).

    ``parts``: ``(dataset, repeat, subsample)``; a part contributes ``repeat * (N // k)``
    indices and index ``i`` maps to ``i * k + randint(k)``. ``dataset[(index, draw)]`` (the
    :class:`~sapiens2_cli.train.sampler.InfiniteSampler` items) seeds the augmentation RNG with
    ``(seed, draw)``; ``dataset[index]`` uses ``draw = index``. A rejected training sample is
    replaced by a uniformly random other index, up to ``max_retries`` times.
    """

    def __init__(
        self,
        parts: Sequence[tuple[Any, int, int]],
        *,
        seed: int,
        train: bool,
        max_retries: int = 1000,
    ) -> None:
        if not parts:
            raise DataError("no dataset folders given (data.train / data.val)")
        self.parts, self.seed, self.train, self.max_retries = list(parts), seed, train, max_retries
        self.sizes = []
        for dataset, repeat, k in self.parts:
            if len(dataset) // k == 0:
                raise DataError(
                    f"{getattr(dataset, 'root', dataset)}: {len(dataset)} samples, "
                    f"fewer than subsample {k}"
                )
            self.sizes.append(repeat * (len(dataset) // k))
        self.offsets = np.cumsum([0, *self.sizes])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def folders(self) -> list[Any]:
        """The folder datasets, in order (e.g. ``folders[0].classes``, ``.keypoint_set``)."""
        return [dataset for dataset, _, _ in self.parts]

    def _locate(self, index: int, rng: np.random.Generator) -> tuple[Any, int]:
        part = int(np.searchsorted(self.offsets, index, side="right")) - 1
        dataset, _, k = self.parts[part]
        local = (index - int(self.offsets[part])) % (len(dataset) // k)
        if k > 1:
            local = local * k + int(rng.integers(k))
        return dataset, local

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        index, draw = item if isinstance(item, tuple) else (item, item)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} outside a dataset of {len(self)} samples")
        rng = np.random.default_rng([self.seed, int(draw)])
        for _ in range(self.max_retries + 1):
            dataset, local = self._locate(index, rng)
            out = dataset.sample(local, rng, train=self.train)
            if out is not None:
                return out
            if not self.train:
                raise DataError(
                    f"validation sample {index} of {getattr(dataset, 'root', '')} was rejected"
                )
            index = int(rng.integers(len(self)))
        raise DataError(
            f"no sample passed the recipe's filters in {self.max_retries} redraws (draw {draw})"
        )


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack each key's tensors when their shapes agree; otherwise (and for non-tensors) a list."""
    out: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if all(isinstance(v, torch.Tensor) for v in values) and len({v.shape for v in values}) == 1:
            out[key] = torch.stack(values)
        else:
            out[key] = values
    return out


def build_dataset(cfg: Any, *, split: Literal["train", "val"]) -> Mixture:
    """The training or validation :class:`Mixture` of a resolved ``Config``."""
    from sapiens2_cli.train.pose_dataset import PoseCocoDataset
    from sapiens2_cli.train.seg_dataset import SegFolder

    specs = cfg.data.train if split == "train" else cfg.data.val
    size = tuple(cfg.model.input_size)
    parts = []
    for spec in specs:
        if cfg.task == "seg":
            class_map = Path(cfg.data.class_map) if cfg.data.class_map else None
            dataset = SegFolder(
                spec.path, augment=cfg.augment, input_size=size, class_map=class_map
            )
        elif cfg.task == "pose":
            dataset = PoseCocoDataset(
                spec.path, augment=cfg.augment, input_size=size, train=split == "train"
            )
        else:
            dataset = DenseFolder(
                spec.path,
                task=cfg.task,
                augment=cfg.augment,
                input_size=size,
                albedo_exr_linear=cfg.data.albedo_exr_linear,
            )
        parts.append((dataset, spec.repeat, spec.subsample))
    _check_same_labels(parts)
    return Mixture(
        parts, seed=cfg.train.seed, train=split == "train", max_retries=cfg.data.max_retries
    )


def _check_same_labels(parts: Sequence[tuple[Any, int, int]]) -> None:
    """Every folder of a mixture must share the class list (seg) or keypoint names (pose)."""

    def labels(dataset: Any) -> tuple[str, ...] | None:
        if hasattr(dataset, "classes"):
            return dataset.classes.names
        if hasattr(dataset, "keypoint_set"):
            return dataset.keypoint_set.names
        return None

    first = parts[0][0] if parts else None
    for dataset, _, _ in parts[1:]:
        if labels(dataset) != labels(first):
            raise DataError(
                f"{dataset.root}: its classes / keypoints differ from those of {first.root}; "
                "every folder of a run must use the same label set"
            )
