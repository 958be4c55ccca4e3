"""Top-down pose dataset: ``DIR/images/`` + ``DIR/annotations.json`` (COCO keypoints).

``annotations.json``: ``images [{id, file_name}]`` (relative to ``DIR/images``),
``annotations [{id, image_id, bbox [x, y, w, h], keypoints | goliath_wholebody_kpts
[x1, y1, v1, ...], area?, iscrowd?}]`` and ``categories`` (one person category; its
``keypoints`` names define the set, see ``keypoints.py``; absent = the 308-point set).
A 344-long array is reduced to 308 by dropping the 36 teeth points. A keypoint is visible
when ``v > 0``; ``area`` defaults to the box area.

One sample per person instance (built with ``train=False``: per evaluated instance).
Training (spec §2.1): keypoints on or outside the image border are made invisible; an
instance is redrawn when it is a crowd, has fewer than ``augment.min_visible`` visible
keypoints, (308-point set) fewer than ``augment.min_visible_body`` among the first 21, or a
greyscale image; the box is the tight box of the visible keypoints (``augment.bbox_source``).
Validation uses the annotation box and skips crowd instances and those without visible
keypoints.

Samples: ``image [3, H, W]``, ``name``; training ``heatmaps [K, H/s, W/s]``,
``keypoint_weights [K]``; validation ``center [2]``, ``box_size [2]`` (image px, for decoding),
``image_id``, ``ann_id``, ``bbox_score`` (1).
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sapiens2_cli.train.datasets import to_model_input
from sapiens2_cli.train.files import DataError, read_image
from sapiens2_cli.train.heatmaps import udp_heatmaps
from sapiens2_cli.train.keypoints import KeypointSet
from sapiens2_cli.train.pose_augment import pose_train, pose_val
from sapiens2_cli.train.pose_metrics import PoseAPMetric
from sapiens2_cli.train.task_config import PoseAugment

__all__ = ["PoseCocoDataset"]

BODY_AND_FEET = 21  # the released loaders count visible keypoints among the first 21 ids


@lru_cache(maxsize=1)
def _index_344_to_308() -> np.ndarray:
    table = json.loads(
        resources.files("sapiens2_cli.data").joinpath("keypoints308.json").read_text()
    )
    mapping = table["original_344_index_to_308_index"]
    keep = [i for i, j in enumerate(mapping) if j is not None]
    return np.array(keep, dtype=np.int64)  # original indices in 308 order


class PoseCocoDataset:
    """COCO-keypoint folder (module docstring); ``keypoint_set`` describes its keypoints."""

    def __init__(
        self,
        root: str | Path,
        *,
        augment: PoseAugment,
        input_size: tuple[int, int],
        train: bool = True,
    ) -> None:
        self.root, self.augment, self.input_size, self.train = (
            Path(root),
            augment,
            tuple(input_size),
            train,
        )
        path = self.root / "annotations.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise DataError(f"{path}: annotation file does not exist") from None
        except (OSError, json.JSONDecodeError) as err:
            raise DataError(f"{path}: cannot read COCO JSON ({err})") from err
        if not isinstance(data, dict) or not {"images", "annotations"} <= data.keys():
            raise DataError(f"{path}: COCO JSON needs 'images' and 'annotations'")
        categories = data.get("categories") or [{}]
        with_kpts = [c for c in categories if c.get("keypoints")] or categories
        if len(with_kpts) != 1:
            raise DataError(f"{path}: expected one keypoint category, found {len(with_kpts)}")
        self.keypoint_set = KeypointSet.from_category(with_kpts[0], str(path))
        self.images = {}
        for image in data["images"]:
            self.images[int(image["id"])] = self.root / "images" / str(image["file_name"])
        missing = [str(p) for p in self.images.values() if not p.is_file()]
        if missing:
            raise DataError(f"{path}: {len(missing)} listed images do not exist, e.g. {missing[0]}")
        self.instances = [self._parse(ann, path) for ann in data["annotations"]]
        self.val_instances = [
            i for i in self.instances if not i["iscrowd"] and (i["keypoints"][:, 2] > 0).any()
        ]

    def _parse(self, ann: dict[str, Any], path: Path) -> dict[str, Any]:
        ann_id = ann.get("id")
        raw = ann.get("goliath_wholebody_kpts") or ann.get("keypoints")
        k = len(self.keypoint_set)
        if raw is None or int(ann.get("image_id", -1)) not in self.images:
            raise DataError(
                f"{path}: annotation {ann_id} lacks keypoints or refers to an unknown image"
            )
        kpts = np.asarray(raw, dtype=np.float64).reshape(-1, 3)
        if self.keypoint_set.is_308 and len(kpts) == 344:
            kpts = kpts[_index_344_to_308()]
        if len(kpts) != k:
            raise DataError(
                f"{path}: annotation {ann_id} has {len(kpts)} keypoints, the category has {k}"
            )
        bbox = np.asarray(ann.get("bbox", [0, 0, 0, 0]), dtype=np.float64)
        if bbox.shape != (4,):
            raise DataError(f"{path}: annotation {ann_id} bbox must be [x, y, w, h]")
        return {
            "id": int(ann_id) if ann_id is not None else -1,
            "image_id": int(ann["image_id"]),
            "keypoints": kpts,
            "box_xyxy": np.array([bbox[0], bbox[1], bbox[0] + bbox[2], bbox[1] + bbox[3]]),
            "area": float(ann.get("area", bbox[2] * bbox[3])),
            "iscrowd": bool(ann.get("iscrowd", 0)),
        }

    def __len__(self) -> int:
        return len(self.instances) if self.train else len(self.val_instances)

    def metric(self, *, nms_threshold: float | None = 0.9) -> PoseAPMetric:
        """A :class:`PoseAPMetric` already holding every ground-truth instance of this folder."""
        if self.keypoint_set.sigmas is None:
            raise DataError(
                f"{self.root / 'annotations.json'}: no OKS sigmas for this keypoint set; "
                "add 'sigmas' to the category"
            )
        metric = PoseAPMetric(
            self.keypoint_set.sigmas, subsets=self.keypoint_set.groups, nms_threshold=nms_threshold
        )
        for inst in self.instances:
            metric.add_ground_truth(
                inst["image_id"], inst["keypoints"], area=inst["area"], iscrowd=inst["iscrowd"]
            )
        return metric

    def sample(self, index: int, rng: np.random.Generator, *, train: bool) -> dict[str, Any] | None:
        out_h, out_w = self.input_size
        if train != self.train:
            raise ValueError(
                f"{self.root}: dataset built with train={self.train}, sampled with train={train}"
            )
        if not train:
            inst = self.val_instances[index]
            image = read_image(self.images[inst["image_id"]])
            crop, center, size = pose_val(
                image,
                inst["box_xyxy"],
                input_size=self.input_size,
                padding=self.augment.bbox_padding,
            )
            return {
                "image": to_model_input(crop),
                "center": torch.from_numpy(center),
                "box_size": torch.from_numpy(size),
                "image_id": inst["image_id"],
                "ann_id": inst["id"],
                "bbox_score": 1.0,
                "name": self.images[inst["image_id"]].stem,
            }
        inst = self.instances[index]
        cfg = self.augment
        image = read_image(self.images[inst["image_id"]])
        img_h, img_w = image.shape[:2]
        xy = inst["keypoints"][:, :2].copy()
        visible = (inst["keypoints"][:, 2] > 0).astype(np.float32)
        outside = (xy[:, 0] <= 0) | (xy[:, 0] >= img_w) | (xy[:, 1] <= 0) | (xy[:, 1] >= img_h)
        visible[outside] = 0
        xy[visible == 0] = 0
        if visible.sum() < cfg.min_visible or inst["iscrowd"]:
            return None
        if self.keypoint_set.is_308 and visible[:BODY_AND_FEET].sum() < cfg.min_visible_body:
            return None
        if (
            cfg.reject_grayscale
            and (image[..., 0] == image[..., 1]).all()
            and (image[..., 1] == image[..., 2]).all()
        ):
            return None
        if cfg.bbox_source == "keypoints":
            pts = xy[visible > 0]
            box = np.concatenate([pts.min(0), pts.max(0)])
            box = np.clip(box, 0, [img_w - 1, img_h - 1, img_w - 1, img_h - 1])
        else:
            box = inst["box_xyxy"]
        result = pose_train(
            image,
            xy,
            visible,
            box,
            rng,
            cfg,
            input_size=self.input_size,
            keypoint_set=self.keypoint_set,
        )
        if result is None:
            return None
        crop, keypoints, visible = result
        heatmaps, weights = udp_heatmaps(
            keypoints,
            visible,
            input_size=(out_w, out_h),
            heatmap_size=(out_w // cfg.heatmap_stride, out_h // cfg.heatmap_stride),
            sigma=cfg.heatmap_sigma,
        )
        return {
            "image": to_model_input(crop),
            "heatmaps": torch.from_numpy(heatmaps),
            "keypoint_weights": torch.from_numpy(weights),
            "name": self.images[inst["image_id"]].stem,
        }
