"""Procedural two-tone images in four layout classes, for pretraining tests (no data files).

Each image is split into a dark (grey 30-100) and a light (grey 150-230) region, plus Gaussian
pixel noise (std 20); the class is the shape of the boundary: vertical line, horizontal line,
diagonal line (either direction) or circle. Offsets, tones, which side is light, and the noise
are random, so neither the mean intensity nor any single pixel tells the class; horizontal
flips keep it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

CLASSES = ("vertical", "horizontal", "diagonal", "circle")


def draw(cls: int, rng: np.random.Generator, size: int = 80) -> np.ndarray:
    """One uint8 BGR ``[size, size, 3]`` image of class ``cls``."""
    y, x = np.mgrid[0:size, 0:size] / size
    offset = rng.uniform(0.3, 0.7)
    name = CLASSES[cls]
    if name == "vertical":
        region = x < offset
    elif name == "horizontal":
        region = y < offset
    elif name == "diagonal":
        region = (x + y) / 2 < offset
        if rng.random() < 0.5:
            region = region[:, ::-1]
    else:
        region = np.hypot(x - 0.5, y - 0.5) < 0.6 * offset
    if rng.random() < 0.5:
        region = ~region
    light = region[..., None].astype(np.float64)
    dark_tone, light_tone = rng.uniform(30, 100), rng.uniform(150, 230)
    img = light_tone * light + dark_tone * (1 - light) + rng.normal(0, 20, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def make_images(n_per_class: int, seed: int, size: int = 80) -> tuple[np.ndarray, np.ndarray]:
    """``[N, size, size, 3]`` uint8 BGR images and ``[N]`` labels, classes interleaved."""
    rng = np.random.default_rng(seed)
    labels = np.tile(np.arange(len(CLASSES)), n_per_class)
    return np.stack([draw(int(c), rng, size) for c in labels]), labels


def write_folder(root: Path, images: np.ndarray, *, per_dir: int = 50) -> list[Path]:
    """PNG files ``root/d<k>/<i>.png``, ``per_dir`` per sub-folder."""
    paths = []
    for i, img in enumerate(images):
        path = root / f"d{i // per_dir:03d}" / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), img)
        paths.append(path)
    return paths


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    """Run a test on one intra-op thread: same arithmetic on every machine, and no
    oversubscription of a shared CPU (two threads made these tiny models 4x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
