"""UDP Gaussian heatmap targets for top-down pose training (training spec §2.1 "Target").

UDP ("unbiased data processing") maps input pixel centres to heatmap pixel centres with the
factor ``(heatmap - 1) / (input - 1)`` per axis, so the corner pixels of the crop land exactly on
the corner pixels of the heatmap. For a visible keypoint at heatmap position ``k`` (float):

    mu = floor(k + 0.5)                               (integer centre)
    H[y, x] = exp(-((x - k_x)^2 + (y - k_y)^2) / (2 sigma^2))
        for |x - mu_x| <= r, |y - mu_y| <= r, r = floor(3 sigma), clipped to the heatmap

i.e. the Gaussian is sampled on an integer window around ``mu`` but centred at the exact
sub-pixel position. Several instances merge with an element-wise max. A keypoint whose window
lies entirely outside the heatmap, or that is invisible, gets weight 0 and no Gaussian.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["udp_heatmaps"]


def udp_heatmaps(
    keypoints: np.ndarray,
    visible: np.ndarray,
    *,
    input_size: tuple[int, int],
    heatmap_size: tuple[int, int],
    sigma: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Encode keypoints of one instance as UDP Gaussian heatmaps.

    Args:
        keypoints: ``[K, 2]`` (x, y) in crop-input pixels (pixel centres at integers).
        visible: ``[K]`` visibility; > 0 means visible.
        input_size: crop input ``(W, H)`` in pixels, e.g. ``(768, 1024)``.
        heatmap_size: heatmap ``(w, h)``, e.g. ``(192, 256)``.
        sigma: Gaussian standard deviation in heatmap pixels.

    Returns:
        ``(heatmaps [K, h, w] float32 in [0, 1], weights [K] float32 in {0, 1})``.
    """
    keypoints = np.asarray(keypoints, dtype=np.float64)
    visible = np.asarray(visible)
    num = keypoints.shape[0]
    if keypoints.shape != (num, 2) or visible.shape != (num,):
        raise ValueError(
            f"keypoints must be [K, 2] and visible [K], got {keypoints.shape}, {visible.shape}"
        )
    (in_w, in_h), (hm_w, hm_h) = input_size, heatmap_size
    stride = np.array([(in_w - 1) / (hm_w - 1), (in_h - 1) / (hm_h - 1)])
    points = keypoints / stride  # [K, 2] heatmap units
    radius = int(math.floor(3 * sigma))
    heatmaps = np.zeros((num, hm_h, hm_w), dtype=np.float32)
    weights = (visible > 0).astype(np.float32)
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    for k in range(num):
        if weights[k] == 0:
            continue
        mu = np.floor(points[k] + 0.5).astype(np.int64)
        x0, y0 = mu - radius
        x1, y1 = mu + radius + 1  # exclusive
        if x0 >= hm_w or y0 >= hm_h or x1 <= 0 or y1 <= 0:
            weights[k] = 0.0
            continue
        gx = np.exp(-((mu[0] + offsets - points[k, 0]) ** 2) / (2 * sigma**2))
        gy = np.exp(-((mu[1] + offsets - points[k, 1]) ** 2) / (2 * sigma**2))
        window = (gy[:, None] * gx[None, :]).astype(np.float32)  # [2r+1, 2r+1]
        cx0, cy0 = max(x0, 0), max(y0, 0)
        cx1, cy1 = min(x1, hm_w), min(y1, hm_h)
        region = window[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
        np.maximum(heatmaps[k, cy0:cy1, cx0:cx1], region, out=heatmaps[k, cy0:cy1, cx0:cx1])
    return heatmaps, weights
