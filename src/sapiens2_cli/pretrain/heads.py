"""Pretraining heads: the MAE pixel decoder and the DINO prototype head.

Decoder positions: fixed 2-D sine-cosine embeddings added to every decoder patch token (MAE and
Sapiens v1 convention), not RoPE. The encoder is RoPE-only, so its output tokens carry no
absolute position and the mask tokens are all identical; an additive absolute code tells each
token where it is before the first decoder block, costs no parameters, works at any grid size
and keeps the decoder (discarded after pretraining) free of the bf16 RoPE arithmetic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sapiens2_cli.models.backbone import Block
from sapiens2_cli.models.layers import rms_norm


def sincos_2d(h: int, w: int, dim: int, *, device: torch.device | None = None) -> torch.Tensor:
    """Fixed 2-D sine-cosine position codes ``[h*w, dim]`` (row-major cells).

    The first ``dim/2`` channels encode the row, the rest the column; each half is
    ``[sin(p * f_i), cos(p * f_i)]`` with ``f_i = 10000^(-i / (dim/4))``, ``p`` in cells.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position codes need a width divisible by 4, got {dim}")
    freqs = 10000.0 ** (-torch.arange(dim // 4, dtype=torch.float32, device=device) / (dim // 4))

    def code(pos: torch.Tensor) -> torch.Tensor:  # [n] -> [n, dim/2]
        angles = pos[:, None] * freqs[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    ys = torch.arange(h, dtype=torch.float32, device=device).repeat_interleave(w)  # [h*w]
    xs = torch.arange(w, dtype=torch.float32, device=device).repeat(h)
    return torch.cat([code(ys), code(xs)], dim=1)


def patchify(images: torch.Tensor, unit: int) -> torch.Tensor:
    """``[B, C, H, W] -> [B, (H/unit)*(W/unit), unit*unit*C]``; cells row-major, values (y, x, c)."""
    b, c, hh, ww = images.shape
    h, w = hh // unit, ww // unit
    x = images[:, :, : h * unit, : w * unit].reshape(b, c, h, unit, w, unit)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, h * w, unit * unit * c)


def reconstruction_target(images: torch.Tensor, cell: int, downsample: int) -> torch.Tensor:
    """Pixels each encoder cell reconstructs: ``[B, N, (cell/downsample)^2 * 3]``.

    ``images`` ``[B, 3, H, W]`` normalised; ``cell`` = input pixels per token (16, or 64 for
    the 4K backbone); ``downsample`` area-averages the image first (2 for the 4K model: its
    64-px cells are reconstructed as 32x32 pixels of the 2K image).
    """
    if downsample > 1:
        images = F.avg_pool2d(images, downsample)
    return patchify(images, cell // downsample)


class MAEDecoder(nn.Module):
    """Visible encoder tokens + mask tokens -> pixels of the masked cells.

    Input: encoder tokens ``[B, P + K, D_enc]`` (``P`` prefix tokens: cls and storage, then the
    ``K`` visible cells in ``keep`` order). Visible features are projected to ``dims``, scattered
    to their cells, mask tokens fill the rest, sin-cos codes are added to all ``N`` cells, the
    projected prefix tokens are prepended, and ``layers`` blocks (the backbone's RMSNorm +
    SwiGLU block, QK-norm, no LayerScale, no RoPE) run over ``P + N`` tokens. A final RMSNorm
    and a linear layer give ``out_dims`` values per masked cell: ``[B, M, out_dims]``.
    """

    def __init__(
        self,
        enc_dims: int,
        out_dims: int,
        *,
        num_prefix: int,
        dims: int = 512,
        layers: int = 8,
        heads: int = 16,
    ) -> None:
        super().__init__()
        self.num_prefix = num_prefix
        self.dims = dims
        self.embed = nn.Linear(enc_dims, dims)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dims))
        self.blocks = nn.ModuleList(
            Block(dims, heads, heads, 4 * dims, qk_norm=True, layer_scale=False) for _ in range(layers)
        )
        self.norm = rms_norm(dims)
        self.pred = nn.Linear(dims, out_dims)

    def forward(
        self,
        tokens: torch.Tensor,
        keep: torch.Tensor,
        masked: torch.Tensor,
        grid: tuple[int, int],
    ) -> torch.Tensor:
        b = tokens.shape[0]
        h, w = grid
        x = self.embed(tokens)  # [B, P + K, d]
        prefix, visible = x[:, : self.num_prefix], x[:, self.num_prefix :]
        cells = self.mask_token.to(x.dtype).expand(b, h * w, self.dims)
        cells = cells.scatter(1, keep[..., None].expand(-1, -1, self.dims), visible)  # [B, N, d]
        cells = cells + sincos_2d(h, w, self.dims, device=x.device).to(x.dtype)
        x = torch.cat([prefix, cells], dim=1)
        for block in self.blocks:
            x = block(x)
        x = x[:, self.num_prefix :].gather(1, masked[..., None].expand(-1, -1, self.dims))  # [B, M, d]
        return self.pred(self.norm(x))


class DINOHead(nn.Module):
    """``[B, D] -> [B, K]`` prototype scores: 3-layer MLP, L2 norm, weight-normalised prototypes.

    ``mlp``: Linear(D, hidden) GELU Linear(hidden, hidden) GELU Linear(hidden, bottleneck).
    Scores are cosines ``<z/|z|, w_k/|w_k|>`` in ``[-1, 1]`` (DINO's weight-normalised last
    layer with its norm fixed to 1), divided by a temperature in the loss.
    """

    def __init__(
        self, in_dims: int, *, prototypes: int, hidden_dims: int = 2048, bottleneck_dims: int = 256
    ) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dims, hidden_dims),
            nn.GELU(),
            nn.Linear(hidden_dims, hidden_dims),
            nn.GELU(),
            nn.Linear(hidden_dims, bottleneck_dims),
        )
        self.prototypes = nn.Parameter(torch.empty(prototypes, bottleneck_dims))
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.mlp(x), dim=-1, eps=1e-6)  # [B, bottleneck]
        return z @ F.normalize(self.prototypes, dim=-1).t()  # [B, K]
