"""Builders of tiny training folders (all tasks) for the tests."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from sapiens2_cli.exr import write_exr

H, W = 64, 48  # the tiny recipes' input size


def image(rng: np.random.Generator, h: int = H, w: int = W) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def seg_folder(root: Path, labels: list[np.ndarray], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i, label in enumerate(labels):
        cv2.imwrite(str(root / "images" / f"im{i}.png"), image(rng, *label.shape))
        cv2.imwrite(str(root / "labels" / f"im{i}.png"), label)
    return root


def person_label(h: int = H, w: int = W) -> np.ndarray:
    label = np.zeros((h, w), np.uint8)
    label[10:50, 5:20] = 5  # left foot
    label[10:50, 20:30] = 3
    label[10:50, 30:40] = 14  # right foot
    label[55:60, :] = 255
    return label


def dense_folder(
    root: Path,
    task: str,
    target: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    ext: str = ".exr",
    k: dict | None = None,
) -> Path:
    folder = {"normal": "normals", "albedo": "albedo", "pointmap": "pointmaps"}[task]
    for sub in ("images", folder):
        (root / sub).mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(root / "images" / "a.jpg"), image(np.random.default_rng(3), *target.shape[:2]))
    if ext == ".exr":
        write_exr(
            root / folder / "a.exr",
            target,
            ["X", "Y", "Z"][: (target.shape[2] if target.ndim == 3 else 1)],
        )
    elif ext == ".npy":
        np.save(root / folder / "a.npy", target)
    else:
        cv2.imwrite(str(root / folder / f"a{ext}"), target)
    if mask is not None:
        (root / "masks").mkdir(exist_ok=True)
        cv2.imwrite(str(root / "masks" / "a.png"), mask.astype(np.uint8) * 255)
    if k is not None:
        (root / "intrinsics").mkdir(exist_ok=True)
        (root / "intrinsics" / "a.json").write_text(json.dumps(k))
    return root


def keypoints308(rng: np.random.Generator, visible: int = 40) -> np.ndarray:
    kp = np.zeros((308, 3))
    kp[:visible, 0] = rng.uniform(20, 60, visible)
    kp[:visible, 1] = rng.uniform(15, 80, visible)
    kp[:visible, 2] = 2
    return kp


def coco_folder(
    root: Path,
    annotations: list[np.ndarray],
    *,
    category: dict | None = None,
    key: str = "keypoints",
) -> Path:
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    cv2.imwrite(str(root / "images" / "p.jpg"), rng.integers(0, 256, (96, 80, 3), dtype=np.uint8))
    anns = []
    for i, kp in enumerate(annotations):
        pts = kp[kp[:, 2] > 0, :2]
        x1, y1 = pts.min(0)
        x2, y2 = pts.max(0)
        anns.append(
            {
                "id": i + 1,
                "image_id": 1,
                "category_id": 1,
                key: kp.ravel().tolist(),
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": float((x2 - x1) * (y2 - y1)),
                "iscrowd": 0,
            }
        )
    data = {
        "images": [{"id": 1, "file_name": "p.jpg"}],
        "annotations": anns,
        "categories": [category or {"id": 1, "name": "person"}],
    }
    (root / "annotations.json").write_text(json.dumps(data))
    return root
