"""Small building blocks shared by the backbone and the heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

RMS_EPS = 1e-6


class LayerScale(nn.Module):
    """Per-channel scale ``x * weight`` (the attention branch's ``gamma``), weight ``[D]``."""

    def __init__(self, dim: int, init_value: float = 1e-4) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


class SwiGLUFFN(nn.Module):
    """SwiGLU feed-forward: ``w3(silu(a) * b)`` where ``[a, b] = w12(x)`` split in halves.

    The first half of ``w12``'s output is the gate; ``hidden`` is the full width F (no 2/3
    shrink). Shapes: ``[..., D] -> [..., D]`` through ``[..., 2F]`` and ``[..., F]``.
    """

    def __init__(self, dim: int, hidden: int, *, bias: bool = True) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden, bias=bias)
        self.w3 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class RMSNorm2d(nn.Module):
    """Channel-wise RMSNorm of a ``[B, C, H, W]`` map (channels moved last, eps 1e-6)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(channels, eps=RMS_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def rms_norm(dim: int) -> nn.RMSNorm:
    """The backbone's RMSNorm: learnable weight, no bias, eps 1e-6."""
    return nn.RMSNorm(dim, eps=RMS_EPS)
