"""Validation of a model on dataset folders with the released metrics, on one or many ranks.

Per task (training spec §4): seg ``SegMetric`` over the model's classes (logits resized to the
label), pose OKS AP (flip test, UDP+DARK decoding, ground-truth boxes), normal ``NormalMetric``,
pointmap ``PointmapMetric`` (canonical space, the scale output ignored) and albedo
``AlbedoMetric``; dense metrics are pooled over every valid pixel of the set. ``MAIN_METRIC``
names the number that selects the best checkpoint.

With several ranks, rank ``r`` evaluates samples ``r, r + W, ...``; every rank runs the same
number of forward passes (the short ones repeat a sample whose result is dropped) because
FSDP's forward is collective. Dense sums are all-reduced; pose predictions are gathered to
rank 0, which runs the AP protocol. Every rank returns the same dictionary.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sapiens2_cli.distributed import DistEnv, all_reduce_sum, broadcast_object, gather_objects
from sapiens2_cli.train.datasets import Mixture, collate
from sapiens2_cli.train.loop import BestMetric
from sapiens2_cli.train.metrics import AlbedoMetric, NormalMetric, PointmapMetric, SegMetric
from sapiens2_cli.train.parallel import unwrap

__all__ = ["MAIN_METRIC", "Evaluator", "evaluate_checkpoint"]

MAIN_METRIC: dict[str, BestMetric] = {
    "seg": BestMetric("mIoU", higher_is_better=True),
    "pose": BestMetric("AP", higher_is_better=True),
    "normal": BestMetric("mean", higher_is_better=False),  # mean angular error, degrees
    "pointmap": BestMetric("l2_mean", higher_is_better=False),  # metres, canonical space
    "albedo": BestMetric("mae", higher_is_better=False),
}
_IMAGE_KEY_STRIDE = 1 << 40  # pose image ids of folder i are offset by i * stride


class Evaluator:
    """Callable ``evaluator(model) -> metrics`` for one task and validation :class:`Mixture`.

    Args:
        num_classes: seg output channels (the metric's class count).
        flip_index: pose left/right partner of each keypoint (flip test); None = no flip test.
        max_samples: evaluate only the first this many samples.
    """

    def __init__(
        self,
        task: str,
        dataset: Mixture,
        env: DistEnv,
        *,
        batch_size: int = 1,
        precision: str = "fp32",
        num_classes: int | None = None,
        flip_index: list[int] | None = None,
        max_samples: int | None = None,
    ) -> None:
        self.task, self.dataset, self.env = task, dataset, env
        self.batch_size, self.precision = batch_size, precision
        self.num_classes, self.flip_index = num_classes, flip_index
        self.length = len(dataset) if max_samples is None else min(max_samples, len(dataset))

    def _my_indices(self) -> list[tuple[int, bool]]:
        """This rank's ``(index, counted)`` pairs, padded to the same count on every rank."""
        world, rank = self.env.world_size, self.env.rank
        per_rank = math.ceil(self.length / world)
        out = []
        for i in range(per_rank):
            index = rank + i * world
            out.append((index, True) if index < self.length else (0, False))
        return out

    @torch.no_grad()
    def __call__(self, model: nn.Module, step: int | None = None) -> dict[str, Any]:
        model = unwrap(model)
        metric = self._new_metric()
        predictions: list[tuple] = []
        pairs = self._my_indices()
        autocast = torch.autocast(
            self.env.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"
        )
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start : start + self.batch_size]
            samples = [self.dataset[index] for index, _ in chunk]
            images = collate(samples)["image"].to(self.env.device)
            with autocast:
                output = self._forward(model, images)
            for j, (index, counted) in enumerate(chunk):
                if counted:
                    self._update(metric, predictions, output, j, samples[j], index)
        return self._finish(metric, predictions)

    def _forward(self, model: nn.Module, images: torch.Tensor) -> Any:
        if self.task == "pose" and self.flip_index is not None:
            from sapiens2_cli.tasks.pose_decode import flip_test

            return flip_test(model, images, self.flip_index)
        return model(images)

    def _new_metric(self) -> Any:
        if self.task == "seg":
            return SegMetric(self.num_classes)
        return {"normal": NormalMetric, "pointmap": PointmapMetric, "albedo": AlbedoMetric}.get(
            self.task, lambda: None
        )()

    def _update(
        self, metric: Any, predictions: list, output: Any, j: int, sample: dict, index: int
    ) -> None:
        if self.task == "seg":
            metric.update(output[j : j + 1].float(), sample["label"][None].to(output.device))
        elif self.task == "pointmap":
            xyz = output[0][j : j + 1].float()
            metric.update(
                xyz, sample["pointmap"][None].to(xyz.device), sample["mask"][None].to(xyz.device)
            )
        elif self.task in ("normal", "albedo"):
            pred = output[j : j + 1].float()
            target = sample[self.task][None].to(pred.device)
            metric.update(pred, target, sample["mask"][None].to(pred.device), pad=sample["pad"])
        else:
            predictions.append(self._pose_prediction(output[j : j + 1], sample, index))

    def _pose_prediction(self, heatmaps: torch.Tensor, sample: dict, index: int) -> tuple:
        from sapiens2_cli.tasks.pose_decode import decode_heatmaps
        from sapiens2_cli.tasks.pose_geometry import heatmap_to_input, input_to_image

        keypoints, scores = decode_heatmaps(heatmaps.float())  # [1, K, 2] heatmap px, [1, K]
        h, w = heatmaps.shape[-2:]
        input_size = tuple(sample["image"].shape[-2:])
        crop = heatmap_to_input(keypoints[0], heatmap_size=(h, w), input_size=input_size)
        image_xy = input_to_image(
            crop,
            center=sample["center"].numpy(),
            scale=sample["box_size"].numpy(),
            input_size=input_size,
        )
        part = int(np.searchsorted(self.dataset.offsets, index, side="right")) - 1
        key = part * _IMAGE_KEY_STRIDE + int(sample["image_id"])
        return key, image_xy, scores[0], float(sample["bbox_score"])

    def _finish(self, metric: Any, predictions: list) -> dict[str, Any]:
        if self.task != "pose":
            all_reduce_sum(metric.sums, self.env)
            if isinstance(metric, AlbedoMetric):
                metric.data_range = broadcast_object(metric.data_range, self.env)
            return metric.compute()
        gathered = gather_objects(predictions, self.env)
        result = None
        if self.env.is_main:
            keys = {p[0] for rank_predictions in gathered for p in rank_predictions}
            pose_metric = self._pose_ground_truth(keys)
            for rank_predictions in gathered:
                for key, xy, scores, bbox_score in rank_predictions:
                    pose_metric.add_prediction(key, xy, scores, bbox_score=bbox_score)
            result = pose_metric.compute()
        return broadcast_object(result, self.env)

    def _pose_ground_truth(self, keys: set[int]) -> Any:
        """Every annotation of the evaluated images (all images unless ``max_samples`` cut the
        set; the images left out hold no instance that counts)."""
        folders = self.dataset.folders
        metric = folders[0].metric()
        metric.images.clear()  # refilled below, limited to the evaluated images
        for part, folder in enumerate(folders):
            for inst in folder.instances:
                key = part * _IMAGE_KEY_STRIDE + inst["image_id"]
                if key not in keys:
                    continue
                metric.add_ground_truth(
                    key,
                    inst["keypoints"],
                    area=inst["area"],
                    iscrowd=inst["iscrowd"],
                )
        return metric


def evaluate_checkpoint(
    ref: str,
    *,
    task: str,
    data: list[str | Path],
    env: DistEnv,
    input_size: tuple[int, int] | None = None,
    batch_size: int = 1,
    flip_test: bool = True,
    max_samples: int | None = None,
) -> dict[str, Any]:
    """Load ``ref`` for ``task`` and evaluate it on the folders ``data`` (``sapiens2 evaluate``).

    ``input_size`` None = the checkpoint's (metadata, else 1024 x 768). A pointmap checkpoint's
    canonical focal comes from its metadata (default: the input width, 768 at 1024 x 768).

    Raises:
        CheckpointError / DataError: unreadable model or data, or a label set that does not
            match the model's outputs (the message names both).
    """
    from sapiens2_cli.train.config import DatasetSpec, default_config, validate
    from sapiens2_cli.train.datasets import DataError, build_dataset
    from sapiens2_cli.weights import load_model

    model = load_model(ref, task=task, device=env.device)
    info = model.info
    size = tuple(input_size or info.input_size)
    cfg = default_config(task)
    cfg.model.input_size = size
    validate(cfg)  # input size: positive multiples of 16
    cfg.data.val = [DatasetSpec(path=str(p)) for p in data]
    if task == "pointmap":
        focal = info.metadata.get("canonical_focal")
        cfg.augment = dataclasses.replace(
            cfg.augment, canonical_focal=float(focal) if focal else float(size[1])
        )
    dataset = build_dataset(cfg, split="val")
    out_channels = info.head.out_channels if info.head is not None else None
    folder = dataset.folders[0]
    flip_index = None
    if task == "seg" and folder.classes.num_classes != out_channels:
        raise DataError(
            f"{folder.root}: {folder.classes.num_classes} classes but {ref} predicts "
            f"{out_channels}; give the folder a classes.json with the model's class list"
        )
    if task == "pose":
        kset = folder.keypoint_set
        if len(kset) != out_channels:
            raise DataError(
                f"{folder.root}: {len(kset)} keypoints but {ref} predicts {out_channels} heatmaps"
            )
        stored = info.metadata.get("flip_index")
        flip_index = json.loads(stored) if stored else [int(i) for i in kset.flip_index]
    evaluator = Evaluator(
        task,
        dataset,
        env,
        batch_size=batch_size,
        num_classes=out_channels,
        flip_index=flip_index if flip_test else None,
        max_samples=max_samples,
    )
    return evaluator(model)
