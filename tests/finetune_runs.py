"""Tiny fine-tuning runs for the tests: learnable folders for every task and a run helper.

``tiny_run(root, task)`` trains the task's ``tiny`` recipe on a folder built here and returns
the run folder (``config.yaml``, ``metrics.jsonl``, ``final.safetensors``...), in a few
seconds on one CPU thread; other tests (e.g. of ``sapiens2 predict --checkpoint``) use it to
get a real fine-tuned checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from train_folders import H, W, coco_folder, keypoints308

from sapiens2_cli.train.config import resolve
from sapiens2_cli.train.finetune import finetune

TASKS = ("seg", "pose", "normal", "pointmap", "albedo")


def _person_mask(h: int = H, w: int = W, shift: int = 0) -> np.ndarray:
    mask = np.zeros((h, w), bool)
    mask[8 : h - 8, 10 + shift : w - 10 + shift] = True
    return mask


def seg_learnable(root: Path, n: int = 4) -> Path:
    """Images whose colour encodes the label (plus noise): a model can learn the mapping."""
    rng = np.random.default_rng(0)
    palette = rng.integers(0, 256, (256, 3))
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(n):
        label = np.zeros((H, W), np.uint8)
        label[10:50, 5 + i : 20 + i] = 5
        label[10:50, 20 + i : 30 + i] = 3
        label[10:50, 30 + i : 40 + i] = 14
        label[55:60, :] = 255
        image = palette[label] + rng.integers(-10, 11, (H, W, 3))
        cv2.imwrite(str(root / "images" / f"im{i}.png"), np.clip(image, 0, 255).astype(np.uint8))
        cv2.imwrite(str(root / "labels" / f"im{i}.png"), label)
    return root


def pose_learnable(root: Path) -> Path:
    rng = np.random.default_rng(0)
    return coco_folder(root, [keypoints308(rng), keypoints308(rng)])


def dense_learnable(root: Path, task: str, n: int = 2) -> Path:
    """Normal / albedo / pointmap folders with smooth targets tied to the image."""
    rng = np.random.default_rng(1)
    folder = {"normal": "normals", "albedo": "albedo", "pointmap": "pointmaps"}[task]
    for sub in ("images", folder, "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float32)
    for i in range(n):
        image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        image = cv2.GaussianBlur(image, (9, 9), 3)
        mask = _person_mask(shift=2 * i)
        name = f"s{i}"
        cv2.imwrite(str(root / "images" / f"{name}.png"), image)
        cv2.imwrite(str(root / "masks" / f"{name}.png"), mask.astype(np.uint8) * 255)
        if task == "albedo":
            target = image[..., ::-1].astype(np.float32) / 255.0  # RGB reflectance = the photo
        elif task == "normal":
            nx, ny = (xs - W / 2) / W, (ys - H / 2) / H
            target = np.stack([nx, ny, -np.ones_like(nx)], -1)
            target /= np.linalg.norm(target, axis=-1, keepdims=True)
        else:
            target = 2.0 + 0.5 * xs / W + 0.1 * i  # a slanted plane, metres
            k = {"K": [[48.0, 0, W / 2 - 0.5], [0, 48.0, H / 2 - 0.5], [0, 0, 1]]}
            (root / "intrinsics").mkdir(exist_ok=True)
            (root / "intrinsics" / f"{name}.json").write_text(json.dumps(k))
        np.save(root / folder / f"{name}.npy", target.astype(np.float32))
    return root


def learnable_folder(task: str, root: Path) -> Path:
    if task == "seg":
        return seg_learnable(root)
    if task == "pose":
        return pose_learnable(root)
    return dense_learnable(root, task)


def tiny_run(
    root: Path,
    task: str,
    *,
    overrides: Sequence[str] = (),
    data: Path | None = None,
    stop_at: int | None = None,
    resume: bool = False,
) -> Path:
    """Train ``<task>/tiny`` into ``root / "run"`` (data built under ``root / "data"`` unless
    given; validation on the same folder); returns the run folder."""
    data = data or learnable_folder(task, root / "data")
    cfg = resolve(f"{task}/tiny", [f"data.train={data}", f"data.val={data}", *overrides])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        finetune(cfg, root / "run", stop_at=stop_at, resume=resume, device="cpu")
    finally:
        torch.set_num_threads(threads)
    return root / "run"


def read_metrics(run: Path, split: str = "train") -> list[dict]:
    """The ``metrics.jsonl`` lines of one split, without the wall-clock field."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in lines if r["split"] == split]
