"""Heatmaps -> keypoints: flip-test merge and the UDP + DARK decoder.

Decoding of one heatmap ``f`` (``h x w``, float32), as in the official ``UDPHeatmap`` codec:

1. Integer argmax ``(x, y)`` (row-major, first occurrence); score ``s = f[y, x]``; if ``s <= 0``
   the location becomes ``(-1, -1)`` (a degenerate path, reproduced as is).
2. DARK refinement on a modulated copy: zero-pad by ``k // 2``, 11x11 Gaussian blur with
   OpenCV's sigma rule ``0.3 * ((k - 1) / 2 - 1) + 0.8`` (= 2.0), crop back, rescale so its
   maximum equals the pre-blur maximum, clip to ``[1e-3, 50]``, natural log, edge-pad by 1.
   With ``g`` = that padded map and ``c = g[y, x]`` (float32, evaluated left to right)::

       dx  = 0.5 * (g[y, x+1] - g[y, x-1])           dy  = 0.5 * (g[y+1, x] - g[y-1, x])
       dxx = g[y, x+1] - 2c + g[y, x-1]              dyy = g[y+1, x] - 2c + g[y-1, x]
       dxy = 0.5 * (g[y+1,x+1] - g[y,x+1] - g[y+1,x] + c + c - g[y,x-1] - g[y-1,x] + g[y-1,x-1])

   then ``(x, y) -= (H + eps I)^-1 (dx, dy)`` with ``H = [[dxx, dxy], [dxy, dyy]]`` and ``eps``
   the float32 machine epsilon; the inverse and the product are float64, the result is
   rounded to float32. Neighbours are read from the per-instance flattened padded stack, so the
   degenerate ``(-1, -1)`` location reads into the previous channel exactly as the official code.
3. Heatmap pixels -> crop pixels (``pose_geometry.heatmap_to_input``).

Two implementations: :func:`decode_udp_reference` (NumPy + ``cv2.GaussianBlur``, bit-identical
to the official decoder) and :func:`decode_udp` (torch, batched, any device: the blur is a
separable depthwise convolution and only the 3x3 neighbourhoods are gathered). Both return
heatmap-pixel locations; the torch path differs from the reference only by float32 rounding
in the blur and the log (OpenCV and NumPy round differently), which moved stable fixture
keypoints by <= 1.2e-3 image px (tolerance 0.02). On CPU the reference is also the faster one,
so :func:`decode_heatmaps` uses it there and the torch path on accelerators.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

#: Blur kernel of the released pose codec (``UDPHeatmap(blur_kernel_size=11)``).
BLUR_KERNEL_SIZE = 11
_CLIP_MIN, _CLIP_MAX = 1e-3, 50.0
_EPS32 = float(np.finfo(np.float32).eps)


def flip_merge(
    heatmaps: torch.Tensor,
    heatmaps_flipped: torch.Tensor,
    flip_indices: Sequence[int] | torch.Tensor,
) -> torch.Tensor:
    """Average plain and flip-test heatmaps.

    ``heatmaps_flipped`` come from the horizontally mirrored input; they are mirrored back along
    W, and output channel ``i`` takes flipped channel ``flip_indices[i]`` (left <-> right
    partners). No sub-pixel shift is applied (UDP needs none).

    Args:
        heatmaps, heatmaps_flipped: ``[N, K, h, w]``.
        flip_indices: ``K`` partner indices (``keypoints308_vis.json["flip_indices"]``).

    Returns:
        ``[N, K, h, w]`` = ``(heatmaps + permuted(mirror(heatmaps_flipped))) * 0.5``.
    """
    if heatmaps.shape != heatmaps_flipped.shape:
        raise ValueError(
            f"heatmap shapes differ: {tuple(heatmaps.shape)} vs {tuple(heatmaps_flipped.shape)}"
        )
    index = torch.as_tensor(flip_indices, dtype=torch.long, device=heatmaps.device)
    if index.shape != (heatmaps.shape[1],):
        raise ValueError(f"{index.numel()} flip indices for {heatmaps.shape[1]} heatmap channels")
    back = heatmaps_flipped.flip(-1).index_select(1, index)
    return (heatmaps + back) * 0.5


def flip_test(
    forward: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    flip_indices: Sequence[int] | torch.Tensor,
) -> torch.Tensor:
    """The demo's flip test: ``flip_merge(forward(x), forward(mirror(x)), flip_indices)``.

    Args:
        forward: normalised crops ``[N, 3, H, W]`` -> heatmaps ``[N, K, h, w]``.
        inputs: ``[N, 3, H, W]``; mirrored along W after normalisation, as the official code.
    """
    return flip_merge(forward(inputs), forward(inputs.flip(-1)), flip_indices)


def gaussian_kernel_1d(kernel_size: int) -> np.ndarray:
    """OpenCV's ``getGaussianKernel(kernel_size, 0, CV_32F)``: sigma from the size, sum 1, float32.

    ``sigma = 0.3 * ((kernel_size - 1) * 0.5 - 1) + 0.8``; taps computed in float64, normalised,
    then rounded to float32 (OpenCV's order).
    """
    if kernel_size % 2 != 1 or kernel_size < 9:
        # OpenCV uses fixed tables for sizes <= 7; only the released size 11 is needed here.
        raise ValueError(f"blur kernel size must be odd and >= 9, got {kernel_size}")
    sigma = 0.3 * ((kernel_size - 1) * 0.5 - 1) + 0.8
    x = np.arange(kernel_size, dtype=np.float64) - (kernel_size - 1) * 0.5
    taps = np.exp((-0.5 / (sigma * sigma)) * x * x)
    return (taps * (1.0 / taps.sum())).astype(np.float32)


def _argmax_locations(flat: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer argmax of ``flat [N, K, h*w]``.

    Returns float32 ``(x, y)`` ``[N, K, 2]`` (-1 where the maximum is <= 0) and scores ``[N, K]``.
    """
    scores, index = flat.max(dim=-1)  # first occurrence of the maximum
    locs = torch.stack([index % width, torch.div(index, width, rounding_mode="floor")], dim=-1)
    locs = locs.to(torch.float32)
    return torch.where((scores <= 0).unsqueeze(-1), torch.full_like(locs, -1.0), locs), scores


def _neighbour_values(blurred: torch.Tensor, locs: torch.Tensor) -> torch.Tensor:
    """Values of the edge-padded stack at the 3x3 neighbourhood of each location.

    Follows the official flat indexing into the per-instance ``[K, h+2, w+2]`` padded stack
    (negative indices wrap around), then maps padded cells back to ``blurred`` cells.

    Args:
        blurred: ``[N, K, h, w]``.
        locs: ``[N, K, 2]`` float32 integer-valued ``(x, y)``, possibly ``-1``.

    Returns:
        ``[N, K, 9]`` in the order (dy, dx) = row-major over ``{-1, 0, 1}^2``.
    """
    n, k, h, w = blurred.shape
    hp, wp = h + 2, w + 2
    device = blurred.device
    base = (locs[..., 0] + 1 + (locs[..., 1] + 1) * wp).to(torch.long)  # [N, K] padded flat index
    base = base + torch.arange(k, device=device) * (hp * wp)
    offsets = torch.tensor([dy * wp + dx for dy in (-1, 0, 1) for dx in (-1, 0, 1)], device=device)
    flat = torch.remainder(base.unsqueeze(-1) + offsets, k * hp * wp)  # [N, K, 9]
    channel = torch.div(flat, hp * wp, rounding_mode="floor")
    cell = flat - channel * (hp * wp)
    py = torch.div(cell, wp, rounding_mode="floor")
    px = cell - py * wp
    # Edge padding: padded cell p reads source cell clamp(p - 1).
    sy = (py - 1).clamp(0, h - 1)
    sx = (px - 1).clamp(0, w - 1)
    source = (channel * h + sy) * w + sx  # [N, K, 9] index into one instance's [K*h*w]
    return blurred.reshape(n, k * h * w).gather(1, source.reshape(n, -1)).reshape(n, k, 9)


def _dark_step(values: torch.Tensor, locs: torch.Tensor, solve_dtype: torch.dtype) -> torch.Tensor:
    """Newton step from the 3x3 log-neighbourhood ``values [N, K, 9]`` -> float32 ``[N, K, 2]``."""
    v = values.unbind(-1)  # 9 x [N, K], row-major (y-1, y, y+1) x (x-1, x, x+1)
    up_left, up, _, left, c, right, _, down, down_right = v
    dx = 0.5 * (right - left)
    dy = 0.5 * (down - up)
    dxx = right - 2 * c + left
    dyy = down - 2 * c + up
    dxy = 0.5 * (down_right - right - down + c + c - left - up + up_left)
    a = dxx.to(solve_dtype) + _EPS32
    d = dyy.to(solve_dtype) + _EPS32
    b = dxy.to(solve_dtype)
    det = a * d - b * b
    gx, gy = dx.to(solve_dtype), dy.to(solve_dtype)
    step_x = (d * gx - b * gy) / det
    step_y = (a * gy - b * gx) / det
    out = torch.stack(
        [locs[..., 0].to(solve_dtype) - step_x, locs[..., 1].to(solve_dtype) - step_y], -1
    )
    return out.to(torch.float32)


def default_solve_dtype(device: torch.device) -> torch.dtype:
    """float64 for the 2x2 solve (as the official code) except on devices without float64 (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _blur_1d(x: torch.Tensor, taps: list[float], dim: int) -> torch.Tensor:
    """Zero-padded 1-D correlation of ``x [..., h, w]`` with odd ``taps`` along ``dim`` (-1 or -2).

    Written as shifted multiply-adds rather than a convolution: plain float32 arithmetic on every
    device (convolutions may run in TF32 on recent GPUs by default, and depthwise convolutions
    are slow on CPU), accumulated from the first tap to the last like OpenCV's row filter.
    """
    pad = len(taps) // 2
    size = x.shape[dim]
    padded = F.pad(x, (pad, pad) if dim == -1 else (0, 0, pad, pad))
    acc = padded.narrow(dim, 0, size) * taps[0]
    for t in range(1, len(taps)):
        acc.add_(padded.narrow(dim, t, size), alpha=taps[t])
    return acc


def decode_udp(
    heatmaps: torch.Tensor,
    *,
    blur_kernel_size: int = BLUR_KERNEL_SIZE,
    solve_dtype: torch.dtype | None = None,
    chunk_size: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched UDP + DARK decode on the heatmaps' device.

    Args:
        heatmaps: ``[N, K, h, w]`` (cast to float32).
        blur_kernel_size: Gaussian kernel size (11 for every released model).
        solve_dtype: dtype of the Hessian solve and the subtraction; ``None`` picks
            :func:`default_solve_dtype`. float32 moved locations by <= 10 float32 ulps
            (2e-5 heatmap px) on the fixtures, 1e-6 px on stable keypoints.
        chunk_size: instances blurred at once (bounds the temporary memory to about
            ``3 * chunk_size * K * h * w`` floats).

    Returns:
        ``keypoints [N, K, 2]`` float32 ``(x, y)`` in heatmap pixels, ``scores [N, K]`` float32
        (the heatmap maxima).
    """
    if heatmaps.ndim != 4:
        raise ValueError(f"expected heatmaps [N, K, h, w], got {tuple(heatmaps.shape)}")
    hm = heatmaps.to(torch.float32)
    n, k, h, w = hm.shape
    locs, scores = _argmax_locations(hm.reshape(n, k, h * w), w)
    taps = gaussian_kernel_1d(blur_kernel_size).tolist()  # float32 values as Python floats

    values = []
    for start in range(0, n, chunk_size):
        part = slice(start, start + chunk_size)
        # The official blur zero-pads by k//2 before cv2.GaussianBlur; its reflect border is never
        # reached inside the crop, so this is a zero-padded separable blur (rows, then columns).
        blurred = _blur_1d(_blur_1d(hm[part], taps, dim=-1), taps, dim=-2)  # [n', K, h, w]
        ratio = scores[part] / blurred.flatten(2).amax(dim=-1)  # float32, like the reference
        # Rescaling, clipping and log are elementwise: apply them to the 9 gathered values only.
        values.append(_neighbour_values(blurred, locs[part]) * ratio.unsqueeze(-1))
    logs = torch.cat(values).clamp(_CLIP_MIN, _CLIP_MAX).log()  # [N, K, 9]
    solve = solve_dtype if solve_dtype is not None else default_solve_dtype(hm.device)
    return _dark_step(logs, locs, solve), scores


def _blur_like_official(heatmaps: np.ndarray, kernel_size: int) -> np.ndarray:
    """Per-channel zero-pad, ``cv2.GaussianBlur``, crop and max-rescale of ``[K, h, w]`` float32."""
    border = kernel_size // 2
    k, h, w = heatmaps.shape
    out = np.empty_like(heatmaps)
    for i in range(k):
        padded = np.zeros((h + 2 * border, w + 2 * border), dtype=np.float32)
        padded[border:-border, border:-border] = heatmaps[i]
        blurred = cv2.GaussianBlur(padded, (kernel_size, kernel_size), 0)[
            border:-border, border:-border
        ]
        out[i] = blurred * (heatmaps[i].max() / blurred.max())
    return out


def decode_udp_reference(
    heatmaps: np.ndarray, *, blur_kernel_size: int = BLUR_KERNEL_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """NumPy/OpenCV UDP + DARK decode, bit-identical to the official codec.

    Args:
        heatmaps: ``[N, K, h, w]`` float32.

    Returns:
        ``keypoints [N, K, 2]`` float32 heatmap pixels and ``scores [N, K]`` float32.
    """
    hm = np.asarray(heatmaps, dtype=np.float32)
    if hm.ndim != 4:
        raise ValueError(f"expected heatmaps [N, K, h, w], got {hm.shape}")
    n, k, h, w = hm.shape
    keypoints = np.empty((n, k, 2), dtype=np.float32)
    scores = np.empty((n, k), dtype=np.float32)
    offsets = np.array([dy * (w + 2) + dx for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
    for i in range(n):
        flat = hm[i].reshape(k, h * w)
        index = flat.argmax(axis=1)
        scores[i] = flat.max(axis=1)
        locs = np.stack([index % w, index // w], axis=-1).astype(np.float32)
        locs[scores[i] <= 0] = -1
        logs = np.log(np.clip(_blur_like_official(hm[i], blur_kernel_size), _CLIP_MIN, _CLIP_MAX))
        padded = np.pad(logs, ((0, 0), (1, 1), (1, 1)), mode="edge").reshape(-1)
        centre = (locs[:, 0] + 1 + (locs[:, 1] + 1) * (w + 2)).astype(np.int64)
        centre += (h + 2) * (w + 2) * np.arange(k)
        g = padded[centre[:, None] + offsets]  # [K, 9]; negative indices wrap like the original
        up_left, up, _, left, c, right, _, down, down_right = g.T
        grad = np.stack([0.5 * (right - left), 0.5 * (down - up)], axis=-1)[..., None]  # [K, 2, 1]
        dxx = right - 2 * c + left
        dyy = down - 2 * c + up
        dxy = 0.5 * (down_right - right - down + c + c - left - up + up_left)
        hessian = np.stack([dxx, dxy, dxy, dyy], axis=-1).reshape(k, 2, 2)
        inverse = np.linalg.inv(hessian + np.finfo(np.float32).eps * np.eye(2))  # float64
        locs -= (inverse @ grad)[..., 0]  # float64 step, stored back into float32
        keypoints[i] = locs
    return keypoints, scores


def decode_heatmaps(
    heatmaps: torch.Tensor, *, blur_kernel_size: int = BLUR_KERNEL_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """Production decode: the exact NumPy/OpenCV path for CPU tensors (it is also the faster one
    there), the batched torch path on accelerators (no heatmap transfer to the host).

    Args:
        heatmaps: ``[N, K, h, w]`` on any device.

    Returns:
        ``keypoints [N, K, 2]`` float32 heatmap pixels and ``scores [N, K]`` float32, on the host.
    """
    if heatmaps.device.type == "cpu":
        return decode_udp_reference(
            heatmaps.detach().float().numpy(), blur_kernel_size=blur_kernel_size
        )
    keypoints, scores = decode_udp(heatmaps.detach(), blur_kernel_size=blur_kernel_size)
    return keypoints.cpu().numpy(), scores.cpu().numpy()
