"""Body-part segmentation: 29 classes, one label per pixel.

Pre-processing stretches the image to the input size (aspect not kept). The logits are
resized bilinearly to the image size and argmaxed (ties go to the lowest class id), as the
official demo does. Output ``OUT/seg/<rel>.png``: single-channel uint8 class ids 0..28
(``.npy`` ``[H, W]`` uint8 with ``--format npy``); ``OUT/seg/classes.json`` holds the names and
the palette once per run. Tiled (``--tile``): the tiles' logits are blended and argmaxed at
full resolution.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
import json
from importlib import resources
from typing import Any

import cv2
import numpy as np
import torch

from sapiens2_cli import transforms
from sapiens2_cli.tasks.base import VIS_FILE, FileSpec, ModelInput, OutputFormat, Prediction, Raw, Task, put_label
from sapiens2_cli.tasks.tiled import TileRule
from sapiens2_cli.writers import FileData

CLASSES_FILE = "classes.json"
# Logits resized to a large image cost 4 * H * W bytes per class; resize and argmax in class
# chunks of at most this many bytes (the result is the same as all classes at once).
ARGMAX_CHUNK_BYTES = 1 << 28


@functools.cache
def released_classes() -> tuple[dict[str, Any], ...]:
    """The 29 released classes: ``{"id", "name", "color_rgb"}`` in id order."""
    text = resources.files("sapiens2_cli").joinpath("data/seg29_classes.json").read_text("utf-8")
    return tuple(
        {"id": c["index"], "name": c["name"], "color_rgb": c["color_rgb"]} for c in json.loads(text)["classes"]
    )


def class_table(names: Sequence[str] | None = None) -> tuple[dict[str, Any], ...]:
    """Classes for a model predicting ``names`` (None: the released 29). A released class name
    keeps its official colour; other classes get distinct generated colours."""
    released = released_classes()
    if names is None or list(names) == [c["name"] for c in released]:
        return released
    official = {c["name"]: c["color_rgb"] for c in released}
    table = []
    for i, name in enumerate(names):
        hue = int((i * 0.618033988749895 % 1.0) * 180)  # golden-ratio hues, OpenCV's 0..179
        rgb = cv2.cvtColor(np.uint8([[[hue, 200, 230]]]), cv2.COLOR_HSV2RGB)[0, 0].tolist()
        table.append({"id": i, "name": str(name), "color_rgb": official.get(name, rgb)})
    return tuple(table)


def model_class_names(info: Any, channels: int) -> tuple[str, ...] | None:
    """Class names stored with a checkpoint or artifact (None: the released ones apply)."""
    names = getattr(info, "labels", ()) or ()
    if not names and "class_names" in getattr(info, "metadata", {}):
        names = tuple(json.loads(info.metadata["class_names"]))
    if names:
        return tuple(names)
    return None if channels == len(released_classes()) else tuple(f"class_{i}" for i in range(channels))


def palette_bgr(table: Sequence[dict[str, Any]] | None = None) -> np.ndarray:
    """``[C, 3]`` uint8 class colours in BGR order."""
    return np.array([c["color_rgb"][::-1] for c in (table or released_classes())], dtype=np.uint8)


def logits_to_labels(
    logits: torch.Tensor, size_hw: tuple[int, int], *, chunk_bytes: int = ARGMAX_CHUNK_BYTES
) -> torch.Tensor:
    """``[C, h, w]`` logits -> ``[H, W]`` int64 labels: bilinear resize to ``size_hw``, then argmax.

    Classes are processed in chunks that fit ``chunk_bytes``; a later class wins only when
    strictly larger, so ties keep the lowest id exactly as a single argmax would.
    """
    num, (h, w) = logits.shape[0], size_hw
    step = max(1, chunk_bytes // (4 * h * w))
    best_val = best_idx = None
    for start in range(0, num, step):
        part = transforms.resize_bilinear(logits[None, start : start + step], size_hw)[0]  # [c, H, W]
        val, idx = part.max(dim=0)
        idx = idx + start
        if best_val is None:
            best_val, best_idx = val, idx
        else:
            better = val > best_val
            best_val = torch.where(better, val, best_val)
            best_idx = torch.where(better, idx, best_idx)
    return best_idx


def legend(labels_present: list[int], height: int, table: Sequence[dict[str, Any]] | None = None) -> np.ndarray:
    """A ``[height, w, 3]`` BGR panel listing the colour and name of each class present
    (in as many columns as the height needs)."""
    row = max(12, height // 31)
    per_column = max(1, height // row - 1)
    columns = max(1, -(-len(labels_present) // per_column))
    width = row * 11
    panel = np.full((height, width * columns, 3), 32, np.uint8)
    table = table or released_classes()
    colours = palette_bgr(table)
    names = {c["id"]: c["name"] for c in table}
    for i, label in enumerate(labels_present):
        x = (i // per_column) * width + row // 2
        y = row // 2 + (i % per_column) * row
        cv2.rectangle(panel, (x, y), (x + row - 4, y + row - 4), colours[label].tolist(), -1)
        put_label(panel, f"{label} {names[label]}", (x + row + row // 2, y + row - 6), row / 32)
    return panel


def _tile_logits(logits: torch.Tensor) -> torch.Tensor:
    return logits


def _tile_labels(logits: torch.Tensor) -> torch.Tensor:
    """Blended ``[29, h, w]`` logits -> ``[h, w]`` uint8 labels (ties: lowest id)."""
    return logits_to_labels(logits, tuple(logits.shape[-2:])).to(torch.uint8)


class SegTask(Task):
    name = "seg"
    tile_rule = TileRule("labels", per_tile=_tile_logits, finish=_tile_labels)

    def __init__(self, classes: Sequence[dict[str, Any]] | None = None) -> None:
        self.classes = tuple(classes or released_classes())

    def for_model(self, model: Any) -> SegTask:
        """This task for a model whose class list may differ from the release (a fine-tune)."""
        head = model.info.head
        channels = head.out_channels if head is not None else len(self.classes)
        return SegTask(class_table(model_class_names(model.info, channels)))

    def files(self, fmt: OutputFormat, vis: bool) -> list[FileSpec]:
        main = FileSpec(".npy", "npy") if fmt == "npy" else FileSpec(".png", "png")
        return [main, VIS_FILE] if vis else [main]

    def run_files(self) -> dict[str, FileData]:
        table = list(self.classes)
        return {CLASSES_FILE: FileData("json", {"format_version": 1, "num_classes": len(table), "classes": table})}

    def prepare(self, image: np.ndarray, input_hw: tuple[int, int]) -> list[ModelInput]:
        pixels, placement = transforms.stretch(image, input_hw)
        return [ModelInput(pixels, placement)]

    def postprocess(self, raws: list[Raw], inputs: list[ModelInput], image_hw: tuple[int, int]) -> Prediction:
        (logits,) = raws  # [29, H_in, W_in]
        labels = logits_to_labels(logits, image_hw)  # [H, W]
        return {"labels": labels.to(torch.uint8).cpu().numpy()}

    def render(self, pred: Prediction, image: np.ndarray, fmt: OutputFormat, vis: bool) -> dict[FileSpec, FileData]:
        main, *rest = self.files(fmt, vis)
        out = {main: FileData(main.kind, pred["labels"])}
        if vis:
            out[VIS_FILE] = FileData("jpg", self.overlay(image, pred["labels"]))
        return out

    def overlay(self, image: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """The demo's 50/50 blend of image and class colours, with a legend of the classes present."""
        mask = palette_bgr(self.classes)[labels]  # [H, W, 3]
        blend = cv2.addWeighted(image, 0.5, mask, 0.5, 0)
        present = np.flatnonzero(np.bincount(labels.ravel(), minlength=len(self.classes))).tolist()
        return np.concatenate([blend, legend(present, image.shape[0], self.classes)], axis=1)

