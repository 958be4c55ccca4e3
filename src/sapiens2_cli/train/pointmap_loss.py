"""Pointmap loss of the released recipe (training spec §2.4): seven weighted terms.

Notation (per batch; all "masked means" pool the valid pixels of the whole batch):
``P~`` predicted canonical pointmap ``[B, 3, H, W]``, ``P`` ground truth (canonical, focal
``f_c``), ``m`` valid mask ``[B, H, W]``, ``D_b`` the GT mean canonical depth of sample b,
``s_b = f_c / f_x`` the GT canonical scale, ``s^_b`` the predicted scale, ``K_b`` the
pre-canonicalisation intrinsics at network resolution, ``N`` the number of valid pixels.

    l1          = min(w * (1/N) sum_valid sum_xyz |P~/D - P/D|, clamp)
    multiscale  = the same after bilinear x2 upsampling of P~/D and P/D (mask nearest)
    silog       = mean_b sqrt(mean_b(d^2) - 0.5 * mean_b(d)^2),
                  d = log max(Z, 1e-4) - log max(Z~, 1e-4)
                  over the valid pixels of sample b (samples without any are skipped)
    intrinsics  = (1/N) sum_valid |X~ - (u - c_x) Z~ / f_x| + |Y~ - (v - c_y) Z~ / f_y|
                  (u, v = column, row index); canonical scaling is isotropic, so K applies
    shift_inv   = min(w * (1/N) sum_valid sum_xyz |(P~/D - c~) - (P/D - c)|, clamp),
                  c~, c = per-sample masked centroids
    normal      = normals of P~/s and P/s (reflect-pad right/bottom, forward differences x100,
                  n = d_x x d_y, normalised); over valid pixels whose right and lower
                  neighbours are valid and whose GT normal is non-degenerate:
                  mean of (1 - <n~, n>) + mean_xyz |n~ - n|
    scale       = mean_b |s^_b - s_b|
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sapiens2_cli.train.task_config import PointmapLoss

__all__ = ["pointmap_loss", "pointmap_normals"]


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    kept = torch.where(mask.unsqueeze(1), values, torch.zeros_like(values))
    return kept.sum() / mask.sum().clamp(min=1).to(values.dtype)


def _finite(value: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(value), value, torch.zeros_like(value))


def pointmap_normals(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit normals ``[B, 3, H, W]`` from a pointmap by forward differences (x100) and a cross
    product ``d_x x d_y``, with reflect padding on the right / bottom; also the pre-normalisation
    length ``[B, H, W]`` (0 where the normal is undefined)."""
    padded = F.pad(points, (0, 1, 0, 1), mode="reflect")
    h, w = points.shape[-2:]
    dx = (padded[..., :h, 1:] - padded[..., :h, :w]) * 100.0
    dy = (padded[..., 1:, :w] - padded[..., :h, :w]) * 100.0
    cross = torch.linalg.cross(dx, dy, dim=1)
    length = cross.norm(dim=1)
    return cross / length.clamp(min=1e-12).unsqueeze(1), length


def pointmap_loss(
    pred: torch.Tensor,
    pred_scale: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    *,
    scale: torch.Tensor,
    intrinsics: torch.Tensor,
    mean_depth: torch.Tensor,
    cfg: PointmapLoss | None = None,
) -> dict[str, torch.Tensor]:
    """All seven weighted terms and their sum ``"loss"`` (see the module docstring).

    Args:
        pred, target: ``[B, 3, H, W]`` canonical XYZ (metres at focal ``f_c``).
        pred_scale: ``[B, 1]`` or ``[B]`` predicted ``f_c / f_x``.
        mask: ``[B, H, W]`` bool.
        scale: ``[B]`` GT ``f_c / f_x``.
        intrinsics: ``[B, 3, 3]`` pre-canonicalisation K at network resolution (pixels).
        mean_depth: ``[B]`` GT mean canonical depth over valid pixels.
    """
    cfg = cfg or PointmapLoss()
    pred, target = pred.float(), target.float()
    b, _, h, w = pred.shape
    mask = mask.bool()
    depth = mean_depth.float().reshape(b, 1, 1, 1).clamp(min=1e-6)
    pred_n, target_n = pred / depth, target / depth

    terms: dict[str, torch.Tensor] = {}
    l1 = _masked_mean((pred_n - target_n).abs(), mask)
    terms["loss_l1"] = (cfg.l1_weight * l1).clamp(max=cfg.clamp)

    up_pred = F.interpolate(pred_n, scale_factor=2, mode="bilinear", align_corners=False)
    up_target = F.interpolate(target_n, scale_factor=2, mode="bilinear", align_corners=False)
    up_mask = F.interpolate(mask[:, None].float(), scale_factor=2, mode="nearest")[:, 0] > 0.5
    multiscale = _masked_mean((up_pred - up_target).abs(), up_mask)
    terms["loss_multiscale"] = (cfg.multiscale_weight * multiscale).clamp(max=cfg.clamp)

    delta = torch.log(target[:, 2].clamp(min=1e-4)) - torch.log(pred[:, 2].clamp(min=1e-4))
    delta = torch.where(mask, delta, torch.zeros_like(delta))
    count = mask.sum((1, 2)).to(delta.dtype)
    has = count > 0
    m1 = delta.sum((1, 2)) / count.clamp(min=1)
    m2 = delta.square().sum((1, 2)) / count.clamp(min=1)
    var = m2 - 0.5 * m1.square()
    silog = torch.where(var > 1e-12, var.clamp(min=1e-12).sqrt(), torch.zeros_like(var))
    silog = (silog * has).sum() / has.sum().clamp(min=1)
    terms["loss_silog"] = cfg.silog_weight * silog

    k = intrinsics.float()
    fx, fy = k[:, 0, 0].reshape(b, 1, 1), k[:, 1, 1].reshape(b, 1, 1)
    cx, cy = k[:, 0, 2].reshape(b, 1, 1), k[:, 1, 2].reshape(b, 1, 1)
    u = torch.arange(w, dtype=pred.dtype, device=pred.device).reshape(1, 1, w)
    v = torch.arange(h, dtype=pred.dtype, device=pred.device).reshape(1, h, 1)
    x_expected = (u - cx) * pred[:, 2] / fx
    y_expected = (v - cy) * pred[:, 2] / fy
    residual = (pred[:, 0] - x_expected).abs() + (pred[:, 1] - y_expected).abs()
    terms["loss_intrinsics"] = cfg.intrinsics_weight * _masked_mean(residual[:, None], mask)

    denom = count.reshape(b, 1, 1, 1).clamp(min=1)

    def centred(x: torch.Tensor) -> torch.Tensor:
        return x - torch.where(mask[:, None], x, 0.0).sum((2, 3), keepdim=True) / denom

    shift = _masked_mean((centred(pred_n) - centred(target_n)).abs(), mask)
    terms["loss_shift_invariant"] = (cfg.shift_invariant_weight * shift).clamp(max=cfg.clamp)

    metric_scale = scale.float().reshape(b, 1, 1, 1)
    normal_pred, _ = pointmap_normals(pred / metric_scale)
    normal_gt, gt_length = pointmap_normals(target / metric_scale)
    mask_padded = F.pad(mask[:, None].float(), (0, 1, 0, 1), mode="reflect")[:, 0] > 0.5
    normal_mask = mask & mask_padded[:, :h, 1:] & mask_padded[:, 1:, :w] & (gt_length > 1e-12)
    per_pixel = (1 - (normal_pred * normal_gt).sum(1, keepdim=True)) + (
        normal_pred - normal_gt
    ).abs().mean(1, keepdim=True)
    terms["loss_normal"] = cfg.normal_weight * _masked_mean(per_pixel, normal_mask)

    terms["loss_scale"] = (
        cfg.scale_weight * (pred_scale.float().reshape(b) - scale.float().reshape(b)).abs().mean()
    )

    terms = {name: _finite(value) for name, value in terms.items()}
    terms["loss"] = sum(terms.values())
    return terms
