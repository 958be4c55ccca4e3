"""Segmentation folders: ``DIR/images/<name>.*`` + ``DIR/labels/<name>.png``.

Labels are single-channel 8-bit class ids (indexed PNGs read as their indices); 255 is
ignored. The class list defaults to the 29-class Sapiens2 taxonomy
(``data/seg29_classes.json``). A class-map JSON (``DIR/classes.json``, else
``data.class_map``) may give:

* ``"remap": {"<source id>": <class id or null>}`` — applied to every label; null and any
  source id not listed become 255;
* ``"classes": [names]`` — a different class list (class weights then default to 1);
* ``"flip_pairs": [[a, b], ...]`` — left/right classes swapped on horizontal flip (default: the
  taxonomy's pairs, or for a custom list the names that differ only by left <-> right).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sapiens2_cli.train import pipelines
from sapiens2_cli.train.augment import DenseSample
from sapiens2_cli.train.datasets import to_model_input
from sapiens2_cli.train.files import (
    DataError,
    find_target,
    list_images,
    read_image,
    read_label,
    require_targets,
)
from sapiens2_cli.train.task_config import SegAugment

__all__ = ["SegClasses", "SegFolder"]

IGNORE = 255


@dataclass(frozen=True)
class SegClasses:
    """Class names, CE weights, flip LUT ``[256]`` and optional source remap LUT ``[256]``."""

    names: tuple[str, ...]
    weights: tuple[float, ...]
    flip_lut: np.ndarray
    remap_lut: np.ndarray | None = None

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @classmethod
    def load(cls, path: Path | None = None) -> SegClasses:
        """The taxonomy, changed by the class-map JSON at ``path`` (None = unchanged)."""
        taxonomy = json.loads(
            resources.files("sapiens2_cli.data").joinpath("seg29_classes.json").read_text()
        )
        names = tuple(c["name"] for c in taxonomy["classes"])
        weights = tuple(float(c["ce_class_weight"]) for c in taxonomy["classes"])
        pairs = [tuple(p) for p in taxonomy["flip_swap_pairs"]]
        spec: dict[str, Any] = {}
        if path is not None:
            try:
                spec = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise DataError(f"{path}: cannot read the class map ({err})") from err
            unknown = set(spec) - {"remap", "classes", "flip_pairs"}
            if not isinstance(spec, dict) or unknown:
                raise DataError(
                    f"{path}: class map keys must be remap, classes, flip_pairs; "
                    f"got {sorted(unknown)}"
                )
            if "classes" in spec:
                names = tuple(str(n) for n in spec["classes"])
                weights = (1.0,) * len(names)
                pairs = _name_pairs(names)
            if "flip_pairs" in spec:
                pairs = [tuple(p) for p in spec["flip_pairs"]]
        if not 0 < len(names) < IGNORE:
            raise DataError(f"{path}: need between 1 and 254 classes, got {len(names)}")
        flip = np.arange(256, dtype=np.uint8)
        for a, b in pairs:
            if not (0 <= a < len(names) and 0 <= b < len(names)):
                raise DataError(f"{path}: flip pair {[a, b]} outside the {len(names)} classes")
            flip[a], flip[b] = b, a
        remap = None
        if "remap" in spec:
            remap = np.full(256, IGNORE, dtype=np.uint8)
            for source, target in spec["remap"].items():
                src = int(source)
                if not 0 <= src < 256 or (target is not None and not 0 <= int(target) < len(names)):
                    raise DataError(
                        f"{path}: remap {source} -> {target} outside 0-255 -> 0-{len(names) - 1}"
                    )
                remap[src] = IGNORE if target is None else int(target)
        return cls(names=names, weights=weights, flip_lut=flip, remap_lut=remap)


def _name_pairs(names: tuple[str, ...]) -> list[tuple[int, int]]:
    index = {n.lower(): i for i, n in enumerate(names)}
    pairs = []
    for i, name in enumerate(names):
        if re.search(r"left", name, re.IGNORECASE):
            partner = re.sub(r"left", "right", name.lower())
            if partner in index:
                pairs.append((i, index[partner]))
    return pairs


class SegFolder:
    """Samples: ``image [3, H, W]``, ``label`` int64 (``[H, W]`` in training, source size in
    validation, 255 = ignore), ``name``."""

    def __init__(
        self,
        root: str | Path,
        *,
        augment: SegAugment,
        input_size: tuple[int, int],
        class_map: Path | None = None,
    ) -> None:
        self.root, self.augment, self.input_size = Path(root), augment, tuple(input_size)
        local = self.root / "classes.json"
        self.classes = SegClasses.load(local if local.is_file() else class_map)
        self.images = list_images(self.root / "images")
        self.labels = [find_target(self.root / "labels", p.stem, (".png",)) for p in self.images]
        require_targets(self.root / "labels", self.images, self.labels, (".png",))
        self.backgrounds: list[Path] = []
        if augment.background.dir and augment.background.p > 0:
            self.backgrounds = list_images(Path(augment.background.dir))

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> DenseSample:
        image_path, label_path = self.images[index], self.labels[index]
        image, label = read_image(image_path), read_label(label_path)
        if label.shape != image.shape[:2]:
            raise DataError(
                f"{label_path}: size {label.shape[1]}x{label.shape[0]} differs from image "
                f"{image_path.name} ({image.shape[1]}x{image.shape[0]})"
            )
        if self.classes.remap_lut is not None:
            label = self.classes.remap_lut[label]
        else:
            bad = (label >= self.classes.num_classes) & (label != IGNORE)
            if bad.any():
                raise DataError(
                    f"{label_path}: label value {int(label[bad][0])} is neither a class id "
                    f"(0-{self.classes.num_classes - 1}) nor {IGNORE}; "
                    "give a class map with a remap"
                )
        return DenseSample(image=image, maps={"label": label})

    def sample(self, index: int, rng: np.random.Generator, *, train: bool) -> dict[str, Any] | None:
        sample = self.load(index)
        if train:
            label = sample.maps["label"]
            if ((label != 0) & (label != IGNORE)).sum() < self.augment.min_foreground_pixels:
                return None
            sample = pipelines.seg_train(
                sample,
                rng,
                self.augment,
                self.input_size,
                flip_lut=self.classes.flip_lut,
                backgrounds=self.backgrounds,
            )
            if sample is None:
                return None
        else:
            sample = pipelines.seg_val(sample, self.input_size)
        return {
            "image": to_model_input(sample.image),
            "label": torch.from_numpy(sample.maps["label"].astype(np.int64)),
            "name": self.images[index].stem,
        }
