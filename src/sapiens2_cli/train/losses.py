"""Fine-tuning losses of the released recipes (training spec §2), one function per task.

Conventions shared by the dense losses: ``mask`` is ``[B, H, W]`` bool (True = supervised);
"masked mean" means a sum over all valid pixels of the batch (pooled, not per image), summed
over channels where stated, divided by the number of valid pixels (or valid neighbour pairs for
gradient terms); an empty mask gives 0. A term that is NaN or infinite is replaced by 0.
Every function returns a dict of already-weighted terms plus ``"loss"``, their sum.
``build_loss`` turns a task's loss section into ``loss_fn(output, batch) -> dict``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from importlib import resources
from typing import Any

import torch
import torch.nn.functional as F

from sapiens2_cli.train.pointmap_loss import pointmap_loss
from sapiens2_cli.train.task_config import AlbedoLoss, NormalLoss, PointmapLoss, PoseLoss, SegLoss

__all__ = [
    "albedo_loss",
    "build_loss",
    "finite_or_zero",
    "heatmap_mse_loss",
    "normal_loss",
    "pointmap_loss",
    "seg29_class_weights",
    "seg_loss",
]


def finite_or_zero(value: torch.Tensor) -> torch.Tensor:
    """``value`` if finite, else 0 (keeps the graph)."""
    return torch.where(torch.isfinite(value), value, torch.zeros_like(value))


def masked_sum_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum(values[..., mask]) / count(mask)``.

    ``values`` ``[B, C, H, W]``, ``mask`` ``[B, H, W]`` bool.
    """
    kept = torch.where(mask.unsqueeze(1), values, torch.zeros_like(values))  # NaN-safe
    return kept.sum() / mask.sum().clamp(min=1).to(values.dtype)


def gradient_sq_error(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked sum-over-channels mean of squared forward-difference errors, x term + y term.

    ``sum_{pairs, c} (d pred - d target)^2 / #pairs`` along x, plus the same along y; a pair is
    valid when both of its pixels are valid. Shapes ``[B, C, H, W]``, mask ``[B, H, W]``.
    """
    dx = (pred[..., 1:] - pred[..., :-1]) - (target[..., 1:] - target[..., :-1])
    dy = (pred[..., 1:, :] - pred[..., :-1, :]) - (target[..., 1:, :] - target[..., :-1, :])
    mask_x = mask[..., 1:] & mask[..., :-1]
    mask_y = mask[..., 1:, :] & mask[..., :-1, :]
    return masked_sum_mean(dx.square(), mask_x) + masked_sum_mean(dy.square(), mask_y)


# --------------------------------------------------------------------------- segmentation
def seg29_class_weights() -> list[float]:
    """Cross-entropy class weights of the 29-class taxonomy (``data/seg29_classes.json``)."""
    text = resources.files("sapiens2_cli.data").joinpath("seg29_classes.json").read_text()
    return [float(c["ce_class_weight"]) for c in json.loads(text)["classes"]]


def seg_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    class_weights: torch.Tensor | list[float],
    ignore_index: int = 255,
    ce_weight: float = 1.0,
    dice_weight: float = 1.0,
    dice_eps: float = 1e-3,
) -> dict[str, torch.Tensor]:
    """Class-weighted cross-entropy + Dice over foreground classes.

    ``logits`` ``[B, C, h, w]`` (bilinearly resized to the label size when it differs),
    ``target`` ``[B, H, W]`` int64 with ``ignore_index`` for unlabelled pixels.

    CE = (1 / (B H W)) sum_pixels w_y * (-log softmax(z)_y), ignored pixels counting 0 in the sum
    but 1 in the denominator (not normalised by the weights).

    Dice, with p = softmax(z) and g = one-hot(y), both zeroed at ignored pixels, classes
    c >= 1 only: D_bc = (2 sum p g + eps) / (sum p^2 + sum g^2 + eps);
    per sample 1 - mean of D_bc over the classes present in its label (0 when none is present);
    averaged over B.
    """
    if logits.shape[-2:] != target.shape[-2:]:
        logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
    logits = logits.float()
    weights = torch.as_tensor(class_weights, dtype=torch.float32, device=logits.device)
    if weights.numel() != logits.shape[1]:
        raise ValueError(f"{weights.numel()} class weights for {logits.shape[1]} logit channels")
    nll = F.cross_entropy(
        logits, target, weight=weights, ignore_index=ignore_index, reduction="none"
    )
    ce = nll.mean()

    valid = target != ignore_index  # [B, H, W]
    probs = logits.softmax(dim=1) * valid.unsqueeze(1)
    onehot = F.one_hot(torch.where(valid, target, 0), logits.shape[1]).permute(0, 3, 1, 2)
    onehot = onehot.to(probs.dtype) * valid.unsqueeze(1)
    p, g = probs[:, 1:], onehot[:, 1:]  # drop background
    dice = (2 * (p * g).sum((2, 3)) + dice_eps) / (
        p.square().sum((2, 3)) + g.square().sum((2, 3)) + dice_eps
    )
    present = (g.sum((2, 3)) > 0).to(dice.dtype)  # [B, C-1]
    count = present.sum(1)
    per_sample = torch.where(
        count > 0, 1 - (dice * present).sum(1) / count.clamp(min=1), torch.zeros_like(count)
    )
    terms = {
        "loss_ce": finite_or_zero(ce_weight * ce),
        "loss_dice": finite_or_zero(dice_weight * per_sample.mean()),
    }
    terms["loss"] = terms["loss_ce"] + terms["loss_dice"]
    return terms


# --------------------------------------------------------------------------- pose
def heatmap_mse_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    keypoint_weights: torch.Tensor,
    *,
    weight: float = 10.0,
) -> dict[str, torch.Tensor]:
    """Keypoint-weighted heatmap MSE: ``weight * mean_{b,k,y,x} w_bk (pred - target)^2``.

    ``pred``, ``target`` ``[B, K, h, w]``; ``keypoint_weights`` ``[B, K]``. The mean runs over
    every element, not only over visible keypoints.
    """
    if pred.shape != target.shape:
        raise ValueError(
            f"heatmap shapes differ: prediction {tuple(pred.shape)}, target {tuple(target.shape)}"
        )
    err = (pred.float() - target.float()).square() * keypoint_weights.float()[:, :, None, None]
    loss = finite_or_zero(weight * err.mean())
    return {"loss_heatmap": loss, "loss": loss}


# --------------------------------------------------------------------------- normals
def normal_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    *,
    cosine_weight: float = 10.0,
    l1_weight: float = 1.0,
    grad_weight: float = 10.0,
) -> dict[str, torch.Tensor]:
    """Surface-normal loss on the raw (unnormalised) prediction.

    ``pred`` ``[B, 3, H, W]``, ``target`` unit vectors ``[B, 3, H, W]``, ``mask`` ``[B, H, W]``;
    N = number of valid pixels:

    cosine = (1/N) sum_valid (1 - <pred/|pred|, n>)
    l1     = (1/N) sum_valid sum_xyz |pred - n|
    grad   = sum_{x-pairs, xyz} (d_x pred - d_x n)^2 / #x-pairs + same along y
    """
    pred, target = pred.float(), target.float()
    cos = (F.normalize(pred, dim=1, eps=1e-12) * target).sum(1, keepdim=True)
    terms = {
        "loss_cosine": cosine_weight * masked_sum_mean(1 - cos, mask),
        "loss_l1": l1_weight * masked_sum_mean((pred - target).abs(), mask),
        "loss_grad": grad_weight * gradient_sq_error(pred, target, mask),
    }
    return _total(terms)


# --------------------------------------------------------------------------- albedo
def albedo_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    *,
    l1_weight: float = 2.0,
    grad_weight: float = 2.0,
    chroma_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Albedo loss on the raw prediction ``[B, 3, H, W]`` against RGB albedo in [0, 1].

    l1     = (1/N) sum_valid sum_rgb |pred - a|
    grad   = 0.5 * (x term + y term) of the squared forward-difference error (see
             ``gradient_sq_error``)
    chroma = (1/N) sum_valid sum_rgb |c(clamp(pred, 0, 1)) - c(a)|, c(v) = v / (R + G + B + 1e-6)
    """
    pred, target = pred.float(), target.float()

    def chroma(rgb: torch.Tensor) -> torch.Tensor:
        return rgb / (rgb.sum(1, keepdim=True) + 1e-6)

    terms = {
        "loss_l1": l1_weight * masked_sum_mean((pred - target).abs(), mask),
        "loss_grad": grad_weight * 0.5 * gradient_sq_error(pred, target, mask),
        "loss_chroma": chroma_weight
        * masked_sum_mean((chroma(pred.clamp(0, 1)) - chroma(target)).abs(), mask),
    }
    return _total(terms)


def _total(terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    terms = {k: finite_or_zero(v) for k, v in terms.items()}
    terms["loss"] = sum(terms.values())
    return terms


# --------------------------------------------------------------------------- registry
LossFn = Callable[[Any, Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]


def build_loss(task: str, cfg: Any, *, class_weights: list[float] | None = None) -> LossFn:
    """``loss_fn(output, batch)`` for ``task`` with the weights of its loss section ``cfg``.

    ``output`` is the model output (pointmap: the tuple ``(pointmap, scale)``) and ``batch`` the
    collated dataset batch (keys as produced by ``datasets.py``). For seg, ``class_weights``
    (from the dataset's class list) is used when ``cfg.class_weights`` is null.
    """
    if task == "seg" and isinstance(cfg, SegLoss):
        weights = cfg.class_weights or class_weights or seg29_class_weights()
        return lambda out, batch: seg_loss(
            out,
            batch["label"],
            class_weights=weights,
            ce_weight=cfg.ce_weight,
            dice_weight=cfg.dice_weight,
            dice_eps=cfg.dice_eps,
        )
    if task == "pose" and isinstance(cfg, PoseLoss):
        return lambda out, batch: heatmap_mse_loss(
            out, batch["heatmaps"], batch["keypoint_weights"], weight=cfg.weight
        )
    if task == "normal" and isinstance(cfg, NormalLoss):
        return lambda out, batch: normal_loss(
            out,
            batch["normal"],
            batch["mask"],
            cosine_weight=cfg.cosine_weight,
            l1_weight=cfg.l1_weight,
            grad_weight=cfg.grad_weight,
        )
    if task == "albedo" and isinstance(cfg, AlbedoLoss):
        return lambda out, batch: albedo_loss(
            out,
            batch["albedo"],
            batch["mask"],
            l1_weight=cfg.l1_weight,
            grad_weight=cfg.grad_weight,
            chroma_weight=cfg.chroma_weight,
        )
    if task == "pointmap" and isinstance(cfg, PointmapLoss):
        return lambda out, batch: pointmap_loss(
            out[0],
            out[1],
            batch["pointmap"],
            batch["mask"],
            scale=batch["scale"],
            intrinsics=batch["intrinsics"],
            mean_depth=batch["mean_depth"],
            cfg=cfg,
        )
    raise ValueError(f"no loss for task {task!r} with a {type(cfg).__name__} section")
