"""Multi-head attention with grouped key/value heads, QK-norm, bf16 RoPE and LayerScale."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sapiens2_cli.models.layers import LayerScale, rms_norm
from sapiens2_cli.models.rope import apply_rope


class GroupedQueryAttention(nn.Module):
    """``proj(attention(q, k, v))`` with ``kv_heads <= heads`` key/value heads.

    Order of operations (it decides parity): q/k RMSNorm over the head dimension, interleaved
    repetition of the kv heads (query head ``h`` uses kv head ``h // (heads / kv_heads)``), RoPE
    on the patch tokens, SDPA with scale ``1/sqrt(head_dim)``, output projection, LayerScale.
    The tokenizer's blocks use this class without QK-norm, RoPE and LayerScale.

    Shapes: ``[B, n, D] -> [B, n, D]``.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        kv_heads: int,
        *,
        qk_norm: bool = True,
        layer_scale: bool = True,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if dim % heads or heads % kv_heads:
            raise ValueError(f"bad attention shape: dim {dim}, heads {heads}, kv heads {kv_heads}")
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.wq = nn.Linear(dim, dim, bias=bias)
        self.wk = nn.Linear(dim, kv_heads * self.head_dim, bias=bias)
        self.wv = nn.Linear(dim, kv_heads * self.head_dim, bias=bias)
        self.q_norm = rms_norm(self.head_dim) if qk_norm else None
        self.k_norm = rms_norm(self.head_dim) if qk_norm else None
        self.proj = nn.Linear(dim, dim, bias=bias)
        self.gamma = LayerScale(dim) if layer_scale else None

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        b, n, dim = x.shape
        q = self.wq(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)  # [B, H, n, d]
        k = self.wk(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)  # [B, kv, n, d]
        v = self.wv(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.kv_heads != self.heads:
            repeat = self.heads // self.kv_heads
            k = k.repeat_interleave(repeat, dim=1)
            v = v.repeat_interleave(repeat, dim=1)
        if rope is not None:
            sin, cos = rope
            q, k = apply_rope(q, sin, cos), apply_rope(k, sin, cos)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, n, d]
        out = self.proj(out.transpose(1, 2).reshape(b, n, dim))
        return self.gamma(out) if self.gamma is not None else out
