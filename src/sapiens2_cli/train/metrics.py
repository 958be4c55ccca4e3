"""Dense evaluation metrics of the released evaluators (training spec §4.1, §4.3-4.5).

Every metric is pooled over all valid pixels of the whole evaluation set: ``update`` adds to a
float64 vector ``sums`` (all-reduce it across ranks, or ``merge`` another instance) and
``compute`` derives the numbers once at the end. Predictions made at network resolution are
brought to the target's frame first (``to_target_frame``: remove the resize+pad padding, then
bilinear resize, ``align_corners=False``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "AlbedoMetric",
    "NormalMetric",
    "PointmapMetric",
    "SegMetric",
    "angle_degrees",
    "to_target_frame",
]

ANGLE_THRESHOLDS = (5.0, 11.25, 22.5, 30.0)  # degrees, strict "<"
HIST_BINS = 360  # 0.5 degree bins on [0, 180]


def to_target_frame(
    pred: torch.Tensor, size: tuple[int, int], pad: torch.Tensor | None = None
) -> torch.Tensor:
    """Crop network-resolution padding and resize to the target size.

    Args:
        pred: ``[B, C, h, w]`` (all samples share ``pad``'s row 0 when ``pad`` is given).
        size: target ``(H, W)``.
        pad: ``[4]`` or ``[B, 4]`` ``(left, right, top, bottom)`` pixels of padding at network
            resolution, as produced by the resize+pad transform; None = no padding.
    """
    if pad is not None:
        left, right, top, bottom = (int(v) for v in torch.as_tensor(pad).reshape(-1, 4)[0])
        h, w = pred.shape[-2:]
        pred = pred[..., top : h - bottom, left : w - right]
    if tuple(pred.shape[-2:]) != tuple(size):
        pred = F.interpolate(pred.float(), size=tuple(size), mode="bilinear", align_corners=False)
    return pred


def angle_degrees(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Angle in degrees ``[B, H, W]`` between normalised ``a`` and ``b`` (``[B, 3, H, W]``)."""
    a = F.normalize(a.double(), dim=1, eps=1e-12)
    b = F.normalize(b.double(), dim=1, eps=1e-12)
    return torch.rad2deg(torch.arccos((a * b).sum(1).clamp(-1.0, 1.0)))


class _Pooled:
    size = 0

    def __init__(self) -> None:
        self.sums = torch.zeros(self.size, dtype=torch.float64)

    def reset(self) -> None:
        self.sums.zero_()

    def merge(self, other: _Pooled) -> None:
        self.sums += other.sums.to(self.sums.device)


def _angle_stats(theta: torch.Tensor) -> torch.Tensor:
    """[count, sum, sum of squares, counts below each threshold] of a 1-D angle tensor (deg)."""
    below = [(theta < t).sum() for t in ANGLE_THRESHOLDS]
    return torch.stack(
        [theta.new_tensor(theta.numel()), theta.sum(), theta.square().sum(), *below]
    ).double()


def _angle_report(stats: torch.Tensor, prefix: str) -> dict[str, float]:
    count = max(stats[0].item(), 1.0)
    out = {
        f"{prefix}mean": stats[1].item() / count,
        f"{prefix}rmse": math.sqrt(stats[2].item() / count),
    }
    for t, n in zip(ANGLE_THRESHOLDS, stats[3:7], strict=True):
        out[f"{prefix}pct_within_{t:g}"] = 100.0 * n.item() / count
    return out


class SegMetric(_Pooled):
    """Confusion-matrix IoU / accuracy over ``num_classes`` (background included).

    IoU_c = I_c / (P_c + G_c - I_c), Acc_c = I_c / G_c, where I = correctly labelled pixels,
    P = predicted, G = ground-truth pixels of class c; a class with an empty denominator counts
    0 (released evaluator, ``nan_to_num=0``). mIoU, mAcc: means over classes; aAcc = sum I /
    sum G. Percentages. Pixels labelled ``ignore_index`` are skipped.
    """

    def __init__(self, num_classes: int, *, ignore_index: int = 255) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.size = num_classes * num_classes
        super().__init__()

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """``pred``: class ids shaped like ``target`` or logits ``[B, C, h, w]``."""
        if pred.dim() == target.dim() + 1:
            pred = to_target_frame(pred, tuple(target.shape[-2:])).argmax(1)
        if pred.shape != target.shape:
            raise ValueError(
                f"prediction {tuple(pred.shape)} and label {tuple(target.shape)} differ"
            )
        valid = target != self.ignore_index
        gt, pr = target[valid].long(), pred[valid].long()
        if gt.numel() and (gt.max() >= self.num_classes or gt.min() < 0):
            raise ValueError(
                f"label ids outside [0, {self.num_classes}) besides {self.ignore_index}"
            )
        index = (gt * self.num_classes + pr).cpu()
        self.sums += torch.bincount(index, minlength=self.size).double()

    @property
    def confusion(self) -> torch.Tensor:
        """``[C, C]``: rows ground truth, columns prediction."""
        return self.sums.reshape(self.num_classes, self.num_classes)

    def compute(self) -> dict[str, float | list[float]]:
        cm = self.confusion
        inter = cm.diag()
        gt, pred = cm.sum(1), cm.sum(0)
        union = gt + pred - inter
        iou = torch.where(union > 0, inter / union.clamp(min=1), 0.0)
        acc = torch.where(gt > 0, inter / gt.clamp(min=1), 0.0)
        return {
            "mIoU": 100.0 * iou.mean().item(),
            "mAcc": 100.0 * acc.mean().item(),
            "aAcc": 100.0 * (inter.sum() / gt.sum().clamp(min=1)).item(),
            "per_class_iou": (100.0 * iou).tolist(),
            "per_class_acc": (100.0 * acc).tolist(),
        }


class NormalMetric(_Pooled):
    """Angular error between normalised prediction and GT normals, in degrees.

    Reported: ``mean``, ``rmse``, ``median`` (centre of the first 0.5 degree histogram bin on
    [0, 180] where the CDF reaches 50 %) and ``pct_within_{5, 11.25, 22.5, 30}`` (strict).
    """

    size = 7 + HIST_BINS

    def update(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        mask: torch.Tensor,
        *,
        pad: torch.Tensor | None = None,
    ) -> None:
        """``pred`` ``[B, 3, h, w]`` raw, ``target`` ``[B, 3, H, W]``, ``mask`` ``[B, H, W]``."""
        pred = to_target_frame(pred, tuple(target.shape[-2:]), pad)
        theta = angle_degrees(pred, target)[mask.bool()].cpu()
        hist = torch.histc(theta, bins=HIST_BINS, min=0.0, max=180.0)
        self.sums += torch.cat([_angle_stats(theta), hist.double()])

    def compute(self) -> dict[str, float]:
        out = _angle_report(self.sums[:7], "")
        hist = self.sums[7:]
        total = hist.sum().item()
        median = float("nan")
        if total > 0:
            cdf = hist.cumsum(0) / total
            first = int(torch.nonzero(cdf >= 0.5)[0].item())
            median = (first + 0.5) * 180.0 / HIST_BINS
        out["median"] = median
        return out


def sobel5_normals(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normals of a pointmap ``[B, 3, H, W]`` from 5x5 Sobel derivatives (reflect-101 borders)
    along x and y and their cross product ``d_x x d_y``.

    Returns:
        ``(unit normals [B, 3, H, W], valid [B, H, W])``; a normal is invalid (and 0) where the
        cross product vanishes, e.g. on the outermost columns and rows, whose reflected
        neighbourhoods give a zero derivative.
    """
    smooth = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=points.dtype, device=points.device)
    deriv = torch.tensor([-1.0, -2.0, 0.0, 2.0, 1.0], dtype=points.dtype, device=points.device)
    kx = torch.outer(smooth, deriv)  # d/dx: derivative along columns
    kernels = torch.stack([kx, kx.T])[:, None]  # [2, 1, 5, 5]
    b, c, h, w = points.shape
    padded = F.pad(points.reshape(b * c, 1, h, w), (2, 2, 2, 2), mode="reflect")
    grads = F.conv2d(padded, kernels).reshape(b, c, 2, h, w)
    cross = torch.linalg.cross(grads[:, :, 0], grads[:, :, 1], dim=1)
    length = cross.norm(dim=1)
    valid = length > 1e-10
    return cross / torch.where(valid, length, 1.0).unsqueeze(1) * valid.unsqueeze(1), valid


class PointmapMetric(_Pooled):
    """Canonical-space pointmap errors (metres) and the angle error of derived normals.

    Per valid pixel e = |P~ - P|_2: ``l2_mean``, ``rmse``, ``x_mae``, ``y_mae``, ``z_mae``,
    ``within_05_cm`` / ``within_10_cm`` / ``within_20_cm`` (fractions with e < 0.05 / 0.10 /
    0.20); normals from 5x5 Sobel derivatives: ``normal_mean``, ``normal_rmse``,
    ``normal_pct_within_{5, 11.25, 22.5, 30}`` over valid pixels where the GT normal is defined.
    """

    size = 9 + 7

    def update(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> None:
        """``pred`` raw P~ (the scale output is ignored) and ``target`` ``[B, 3, H, W]``,
        ``mask`` ``[B, H, W]``."""
        pred = to_target_frame(pred, tuple(target.shape[-2:])).double()
        target = target.double()
        mask = mask.bool()
        diff = (pred - target).permute(0, 2, 3, 1)[mask]  # [N, 3]
        err = diff.norm(dim=1)
        stats = [err.new_tensor(err.numel()), err.sum(), err.square().sum(), *diff.abs().sum(0)]
        stats += [(err < t).sum() for t in (0.05, 0.10, 0.20)]
        normal_pred, _ = sobel5_normals(pred)
        normal_gt, defined = sobel5_normals(target)
        # degenerate predicted normals are 0 vectors and count as 90 degrees
        cos = (normal_pred * normal_gt).sum(1).clamp(-1.0, 1.0)
        theta = torch.rad2deg(torch.arccos(cos))[mask & defined]
        self.sums += torch.cat([torch.stack(stats).double(), _angle_stats(theta)]).cpu()

    def compute(self) -> dict[str, float]:
        s = self.sums.tolist()
        count = max(s[0], 1.0)
        out = {
            "l2_mean": s[1] / count,
            "rmse": math.sqrt(s[2] / count),
            "x_mae": s[3] / count,
            "y_mae": s[4] / count,
            "z_mae": s[5] / count,
            "within_05_cm": s[6] / count,
            "within_10_cm": s[7] / count,
            "within_20_cm": s[8] / count,
        }
        out.update(_angle_report(self.sums[9:], "normal_"))
        return out


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


class AlbedoMetric(_Pooled):
    """Albedo errors over valid pixels; predictions are resized, not clamped.

    ``mae`` / ``rmse``: pooled mean of the channel-averaged |A^ - A| / (A^ - A)^2 (root);
    ``psnr`` = 10 log10(R^2 / MSE) with R = 1, or 255 when the first GT batch exceeds 1.5;
    ``ssim``: 11x11 Gaussian (sigma 1.5), masked local statistics (each normalised by the
    window-weighted mask W_m), C1 = (0.01 R)^2, C2 = (0.03 R)^2, channel-averaged, averaged over
    pixels with W_m > 0.5; ``grad_l1``: mean over valid horizontal and vertical neighbour pairs
    of the channel-averaged |d A^ - d A|.
    """

    size = 7

    def __init__(self) -> None:
        super().__init__()
        self.data_range: float | None = None

    def update(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        mask: torch.Tensor,
        *,
        pad: torch.Tensor | None = None,
    ) -> None:
        """``pred`` ``[B, 3, h, w]``, ``target`` ``[B, 3, H, W]``, ``mask`` ``[B, H, W]``."""
        pred = to_target_frame(pred, tuple(target.shape[-2:]), pad).double()
        target = target.double()
        mask = mask.bool()
        if self.data_range is None:
            self.data_range = 255.0 if target.max().item() > 1.5 else 1.0
        abs_err = (pred - target).abs().mean(1)[mask]
        sq_err = (pred - target).square().mean(1)[mask]
        ssim_sum, ssim_count = self._ssim(pred, target, mask)
        grad_sum, grad_count = self._grad(pred, target, mask)
        stats = [
            float(abs_err.numel()),
            abs_err.sum().item(),
            sq_err.sum().item(),
            ssim_sum,
            ssim_count,
            grad_sum,
            grad_count,
        ]
        self.sums += torch.tensor(stats, dtype=torch.float64)

    def _ssim(
        self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
    ) -> tuple[float, float]:
        window = _gaussian_window().to(pred.device)[None, None]  # [1, 1, 11, 11]
        m = mask[:, None].double()
        r = self.data_range or 1.0
        c1, c2 = (0.01 * r) ** 2, (0.03 * r) ** 2

        def filt(x: torch.Tensor) -> torch.Tensor:  # per channel, zero padding
            b, c, h, w = x.shape
            return F.conv2d(x.reshape(b * c, 1, h, w), window, padding=5).reshape(b, c, h, w)

        wm = filt(m)
        norm = wm.clamp(min=1e-12)
        mu_x, mu_y = filt(pred * m) / norm, filt(target * m) / norm
        var_x = filt(pred.square() * m) / norm - mu_x.square()
        var_y = filt(target.square() * m) / norm - mu_y.square()
        cov = filt(pred * target * m) / norm - mu_x * mu_y
        ssim = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
            (mu_x.square() + mu_y.square() + c1) * (var_x + var_y + c2)
        )
        keep = wm[:, 0] > 0.5
        return ssim.mean(1)[keep].sum().item(), float(keep.sum().item())

    @staticmethod
    def _grad(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
        dx = ((pred[..., 1:] - pred[..., :-1]) - (target[..., 1:] - target[..., :-1])).abs().mean(1)
        dy = (
            ((pred[..., 1:, :] - pred[..., :-1, :]) - (target[..., 1:, :] - target[..., :-1, :]))
            .abs()
            .mean(1)
        )
        mx = mask[..., 1:] & mask[..., :-1]
        my = mask[..., 1:, :] & mask[..., :-1, :]
        return (dx[mx].sum() + dy[my].sum()).item(), float(mx.sum().item() + my.sum().item())

    def merge(self, other: _Pooled) -> None:
        super().merge(other)
        if self.data_range is None:
            self.data_range = getattr(other, "data_range", None)

    def compute(self) -> dict[str, float]:
        count, abs_sum, sq_sum, ssim_sum, ssim_count, grad_sum, grad_count = self.sums.tolist()
        mse = sq_sum / max(count, 1.0)
        r = self.data_range or 1.0
        return {
            "mae": abs_sum / max(count, 1.0),
            "rmse": math.sqrt(mse),
            "psnr": 10 * math.log10(r * r / mse) if mse > 0 else float("inf"),
            "ssim": ssim_sum / max(ssim_count, 1.0),
            "grad_l1": grad_sum / max(grad_count, 1.0),
        }
