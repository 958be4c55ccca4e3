"""Multi-head attention with grouped key/value heads, QK-norm, bf16 RoPE and LayerScale."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sapiens2_cli.models.layers import LayerScale, rms_norm
from sapiens2_cli.models.rope import apply_rope

QKV_NAMES = ("wq", "wk", "wv")


class GroupedQueryAttention(nn.Module):
    """``proj(attention(q, k, v))`` with ``kv_heads <= heads`` key/value heads.

    Order of operations (it decides parity): q/k RMSNorm over the head dimension, RoPE on the
    patch tokens, SDPA with scale ``1/sqrt(head_dim)`` where query head ``h`` uses kv head
    ``h // (heads / kv_heads)`` (interleaved grouping), output projection, LayerScale. RoPE is
    elementwise per head, so rotating the kv heads before SDPA repeats them is the same as
    rotating the repeated heads. The tokenizer's blocks use this class without QK-norm, RoPE and
    LayerScale.

    ``fuse_qkv()`` replaces ``wq``/``wk``/``wv`` by one ``[D + 2*kv*d, D]`` projection for
    inference; ``state_dict()`` and ``load_state_dict()`` keep speaking the released
    ``wq``/``wk``/``wv`` keys either way.

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
        # the fused projection, present only after fuse_qkv()
        self.register_parameter("qkv_weight", None)
        self.register_parameter("qkv_bias", None)

    @property
    def fused(self) -> bool:
        return self.qkv_weight is not None

    def _qkv_sizes(self) -> tuple[int, int, int]:
        kv = self.kv_heads * self.head_dim
        return (self.heads * self.head_dim, kv, kv)

    def fuse_qkv(self) -> None:
        """Concatenate ``wq``, ``wk``, ``wv`` into one projection (one GEMM per forward).

        Idempotent. Meant for inference: the state dict of a fused module holds copies of the
        three slices, not the parameters themselves.
        """
        if self.fused:
            return
        parts = [getattr(self, name) for name in QKV_NAMES]
        with torch.no_grad():
            weight = torch.cat([p.weight for p in parts])  # [D + 2*kv*d, D]
            bias = torch.cat([p.bias for p in parts]) if parts[0].bias is not None else None
        grad = parts[0].weight.requires_grad
        self.qkv_weight = nn.Parameter(weight, requires_grad=grad)
        if bias is not None:
            self.qkv_bias = nn.Parameter(bias, requires_grad=grad)
        for name in QKV_NAMES:
            delattr(self, name)

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # noqa: ANN001 - nn.Module hook
        if not self.fused:
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        # released layout: wq/wk/wv come first, as the unfused module writes them
        sizes = self._qkv_sizes()
        tensors = {"weight": self.qkv_weight, "bias": self.qkv_bias}
        splits = {k: t.detach().split(sizes) for k, t in tensors.items() if t is not None}
        for i, name in enumerate(QKV_NAMES):
            for kind, parts in splits.items():
                # copies: safetensors refuses tensors that share storage
                destination[f"{prefix}{name}.{kind}"] = parts[i].clone()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        if self.fused:
            for kind in ("weight", "bias"):
                keys = [f"{prefix}{name}.{kind}" for name in QKV_NAMES]
                if all(k in state_dict for k in keys):
                    state_dict[f"{prefix}qkv_{kind}"] = torch.cat([state_dict.pop(k) for k in keys])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        b, n, dim = x.shape
        if self.fused:
            q, k, v = F.linear(x, self.qkv_weight, self.qkv_bias).split(self._qkv_sizes(), dim=-1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q = q.view(b, n, self.heads, self.head_dim).transpose(1, 2)  # [B, H, n, d]
        k = k.view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)  # [B, kv, n, d]
        v = v.view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            sin, cos = rope
            q, k = apply_rope(q, sin, cos), apply_rope(k, sin, cos)
        out = F.scaled_dot_product_attention(
            q, k, v, enable_gqa=self.kv_heads != self.heads
        )  # [B, H, n, d]
        out = self.proj(out.transpose(1, 2).reshape(b, n, dim))
        return self.gamma(out) if self.gamma is not None else out


def fuse_qkv(module: nn.Module) -> nn.Module:
    """Fuse the q/k/v projections of every attention layer inside ``module``; returns it."""
    for m in module.modules():
        if isinstance(m, GroupedQueryAttention):
            m.fuse_qkv()
    return module
