"""Keypoint OKS average precision, COCO style, for any keypoint set (training spec §4.2).

OKS between a ground-truth instance (keypoints k_i, visibility v_i, area a) and a prediction
(keypoints k^_i):

    OKS = sum_i exp(-|k^_i - k_i|^2 / (2 a (2 sigma_i)^2)) [v_i > 0] / sum_i [v_i > 0]

Evaluation follows the COCO keypoint protocol: per image, predictions sorted by score and cut
to ``max_dets`` (20); for each OKS threshold in 0.50:0.05:0.95 they are matched greedily to the
best still-unmatched ground truth with OKS >= threshold (non-ignored ground truths first); a
ground truth is ignored when it is a crowd or has no visible keypoint (in the evaluated
subset). Over all images, predictions are ranked by score, precision is made monotone and
sampled at 101 recall points; AP is its mean, AR the final recall, both averaged over
thresholds. Area ranges: all, medium (32^2..96^2), large (> 96^2) by the annotation ``area``;
unmatched predictions outside a range are ignored using their keypoint-extent area.

Instance scores: ``bbox_score * mean(keypoint scores > 0.2)`` (0 when none passes); optional
OKS-NMS per image (threshold 0.9) with the average of the two extent areas.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["PoseAPMetric", "instance_score", "oks_matrix", "oks_nms"]

AREA_RANGES = {"": (0.0, 1e10), "_M": (32.0**2, 96.0**2), "_L": (96.0**2, 1e10)}
OKS_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)


def oks_matrix(
    pred: np.ndarray,
    gt: np.ndarray,
    gt_visible: np.ndarray,
    gt_area: np.ndarray,
    sigmas: np.ndarray,
) -> np.ndarray:
    """OKS of every prediction against every ground truth.

    Args:
        pred: ``[D, K, 2]`` predicted (x, y) in image pixels.
        gt: ``[G, K, 2]``; ``gt_visible`` ``[G, K]`` (> 0 = counted); ``gt_area`` ``[G]`` px^2.
        sigmas: ``[K]`` per-keypoint constants.

    Returns:
        ``[D, G]``; a ground truth without visible keypoints gets OKS 0.
    """
    var = (2 * np.asarray(sigmas, dtype=np.float64)) ** 2  # [K]
    d2 = ((pred[:, None] - gt[None]) ** 2).sum(-1)  # [D, G, K]
    e = d2 / var / (gt_area[None, :, None] + np.spacing(1)) / 2
    vis = (gt_visible > 0)[None]  # [1, G, K]
    count = vis.sum(-1)
    return np.where(count > 0, (np.exp(-e) * vis).sum(-1) / np.maximum(count, 1), 0.0)


def instance_score(
    keypoint_scores: np.ndarray, bbox_score: float = 1.0, threshold: float = 0.2
) -> float:
    """``bbox_score`` times the mean of the keypoint scores above ``threshold`` (0 if none)."""
    scores = np.asarray(keypoint_scores, dtype=np.float64)
    passing = scores[scores > threshold]
    return float(bbox_score * passing.mean()) if passing.size else 0.0


def _extent_area(keypoints: np.ndarray) -> np.ndarray:
    """``[N, K, 2]`` -> ``[N]`` area of the keypoints' bounding box."""
    span = keypoints.max(1) - keypoints.min(1)
    return span[:, 0] * span[:, 1]


def oks_nms(
    keypoints: np.ndarray, scores: np.ndarray, sigmas: np.ndarray, threshold: float
) -> list[int]:
    """Indices kept by greedy OKS-NMS (all keypoints counted, area = mean of both extents)."""
    order = list(np.argsort(-np.asarray(scores), kind="stable"))
    areas = _extent_area(keypoints)
    var = (2 * np.asarray(sigmas, dtype=np.float64)) ** 2
    keep: list[int] = []
    while order:
        i = order.pop(0)
        keep.append(i)
        if not order:
            break
        rest = np.array(order)
        d2 = ((keypoints[rest] - keypoints[i]) ** 2).sum(-1)  # [R, K]
        area = (areas[rest] + areas[i])[:, None] / 2 + np.spacing(1)
        oks = np.exp(-d2 / var / area / 2).mean(-1)
        order = [j for j, o in zip(order, oks, strict=True) if o <= threshold]
    return keep


@dataclass
class _Image:
    gt_xy: list[np.ndarray] = field(default_factory=list)
    gt_vis: list[np.ndarray] = field(default_factory=list)
    gt_area: list[float] = field(default_factory=list)
    gt_crowd: list[bool] = field(default_factory=list)
    dt_xy: list[np.ndarray] = field(default_factory=list)
    dt_score: list[float] = field(default_factory=list)


class PoseAPMetric:
    """Accumulates ground truths and predictions per image; ``compute`` runs the COCO protocol.

    ``subsets`` maps a name to keypoint indices evaluated on their own (e.g. the body, foot,
    face and hand groups); the whole set is always evaluated and reported without prefix.
    """

    def __init__(
        self,
        sigmas: np.ndarray,
        *,
        subsets: dict[str, np.ndarray] | None = None,
        max_dets: int = 20,
        nms_threshold: float | None = 0.9,
    ) -> None:
        self.sigmas = np.asarray(sigmas, dtype=np.float64)
        self.subsets = {k: np.asarray(v, dtype=np.int64) for k, v in (subsets or {}).items()}
        self.max_dets = max_dets
        self.nms_threshold = nms_threshold
        self.images: dict[int, _Image] = {}

    def add_ground_truth(
        self, image_id: int, keypoints: np.ndarray, *, area: float, iscrowd: bool = False
    ) -> None:
        """``keypoints`` ``[K, 3]`` (x, y, visibility) in image pixels; ``area`` in px^2."""
        kp = np.asarray(keypoints, dtype=np.float64).reshape(len(self.sigmas), 3)
        image = self.images.setdefault(int(image_id), _Image())
        image.gt_xy.append(kp[:, :2])
        image.gt_vis.append(kp[:, 2])
        image.gt_area.append(float(area))
        image.gt_crowd.append(bool(iscrowd))

    def add_prediction(
        self,
        image_id: int,
        keypoints: np.ndarray,
        keypoint_scores: np.ndarray,
        *,
        bbox_score: float = 1.0,
        score: float | None = None,
    ) -> None:
        """``keypoints`` ``[K, 2]`` in image pixels; ``score`` None = :func:`instance_score`."""
        image = self.images.setdefault(int(image_id), _Image())
        image.dt_xy.append(np.asarray(keypoints, dtype=np.float64).reshape(len(self.sigmas), 2))
        image.dt_score.append(
            instance_score(keypoint_scores, bbox_score) if score is None else float(score)
        )

    def merge(self, other: PoseAPMetric) -> None:
        for image_id, theirs in other.images.items():
            mine = self.images.setdefault(image_id, _Image())
            for name in ("gt_xy", "gt_vis", "gt_area", "gt_crowd", "dt_xy", "dt_score"):
                getattr(mine, name).extend(getattr(theirs, name))

    def compute(self) -> dict[str, float]:
        """``AP, AP50, AP75, AP_M, AP_L, AR, AR50, AR75, AR_M, AR_L`` (fractions in [0, 1]) for
        the whole set, then the same prefixed by each subset name (``face/AP`` ...)."""
        out = self._evaluate(np.arange(len(self.sigmas)))
        for name, idx in self.subsets.items():
            out.update({f"{name}/{k}": v for k, v in self._evaluate(idx).items()})
        return out

    def _evaluate(self, idx: np.ndarray) -> dict[str, float]:
        per_image = []
        for image_id in sorted(self.images):
            image = self.images[image_id]
            per_image.append(self._prepare(image, idx))
        out: dict[str, float] = {}
        for suffix, area_range in AREA_RANGES.items():
            precision, recall = self._accumulate(per_image, area_range)
            out[f"AP{suffix}"] = _mean_valid(precision)
            out[f"AR{suffix}"] = _mean_valid(recall)
            if suffix == "":
                for t, name in ((0, "50"), (5, "75")):
                    out[f"AP{name}"] = _mean_valid(precision[t])
                    out[f"AR{name}"] = _mean_valid(recall[t : t + 1])
        return out

    def _prepare(self, image: _Image, idx: np.ndarray) -> tuple:
        k = len(self.sigmas)
        dt_xy = np.array(image.dt_xy).reshape(-1, k, 2)
        dt_score = np.array(image.dt_score, dtype=np.float64)
        if self.nms_threshold is not None and len(dt_score) > 1:
            kept = sorted(oks_nms(dt_xy, dt_score, self.sigmas, self.nms_threshold))
            dt_xy, dt_score = dt_xy[kept], dt_score[kept]
        order = np.argsort(-dt_score, kind="stable")[: self.max_dets]
        dt_xy, dt_score = dt_xy[order], dt_score[order]
        dt_area = _extent_area(dt_xy) if len(dt_xy) else np.zeros(0)
        gt_xy = np.array(image.gt_xy).reshape(-1, k, 2)[:, idx]
        gt_vis = np.array(image.gt_vis).reshape(-1, k)[:, idx]
        gt_area = np.array(image.gt_area, dtype=np.float64)
        gt_crowd = np.array(image.gt_crowd, dtype=bool)
        ious = oks_matrix(dt_xy[:, idx], gt_xy, gt_vis, gt_area, self.sigmas[idx])
        gt_base_ignore = gt_crowd | ((gt_vis > 0).sum(1) == 0)
        return dt_score, dt_area, gt_area, gt_crowd, gt_base_ignore, ious

    def _accumulate(
        self, per_image: list[tuple], area_range: tuple[float, float]
    ) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = area_range
        scores, matched, ignored = [], [], []
        num_gt = 0
        for dt_score, dt_area, gt_area, gt_crowd, gt_base_ignore, ious in per_image:
            gt_ignore = gt_base_ignore | (gt_area < lo) | (gt_area > hi)
            gt_order = np.argsort(gt_ignore, kind="stable")  # non-ignored first
            g_ign, g_crowd = gt_ignore[gt_order], gt_crowd[gt_order]
            iou = ious[:, gt_order]
            num_gt += int((~g_ign).sum())
            d = len(dt_score)
            dt_m = np.zeros((len(OKS_THRESHOLDS), d), dtype=bool)
            dt_ig = np.zeros((len(OKS_THRESHOLDS), d), dtype=bool)
            for t, thr in enumerate(OKS_THRESHOLDS):
                gt_taken = np.zeros(len(g_ign), dtype=bool)
                for di in range(d):
                    best, best_iou = -1, min(thr, 1 - 1e-10)
                    for gi in range(len(g_ign)):
                        if gt_taken[gi] and not g_crowd[gi]:
                            continue
                        if best > -1 and not g_ign[best] and g_ign[gi]:
                            break  # only ignored ground truths remain
                        if iou[di, gi] < best_iou:
                            continue
                        best, best_iou = gi, iou[di, gi]
                    if best == -1:
                        continue
                    dt_m[t, di] = True
                    dt_ig[t, di] = g_ign[best]
                    gt_taken[best] = True
            outside = (dt_area < lo) | (dt_area > hi)
            dt_ig |= ~dt_m & outside[None]
            scores.append(dt_score)
            matched.append(dt_m)
            ignored.append(dt_ig)
        precision = -np.ones((len(OKS_THRESHOLDS), len(RECALL_POINTS)))
        recall = -np.ones(len(OKS_THRESHOLDS))
        if num_gt == 0:
            return precision, recall
        all_scores = np.concatenate(scores) if scores else np.zeros(0)
        order = np.argsort(-all_scores, kind="mergesort")
        dt_m = np.concatenate(matched, axis=1)[:, order] if scores else np.zeros((10, 0), bool)
        dt_ig = np.concatenate(ignored, axis=1)[:, order] if scores else np.zeros((10, 0), bool)
        tps = np.cumsum(dt_m & ~dt_ig, axis=1, dtype=np.float64)
        fps = np.cumsum(~dt_m & ~dt_ig, axis=1, dtype=np.float64)
        for t in range(len(OKS_THRESHOLDS)):
            tp, fp = tps[t], fps[t]
            rc = tp / num_gt
            pr = tp / (tp + fp + np.spacing(1))
            recall[t] = rc[-1] if len(rc) else 0.0
            pr = np.maximum.accumulate(pr[::-1])[::-1] if len(pr) else pr
            hits = np.searchsorted(rc, RECALL_POINTS, side="left")
            q = np.zeros(len(RECALL_POINTS))
            valid = hits < len(pr)
            q[valid] = pr[hits[valid]]
            precision[t] = q
        return precision, recall


def _mean_valid(values: np.ndarray) -> float:
    kept = values[values > -1]
    return float(kept.mean()) if kept.size else -1.0
