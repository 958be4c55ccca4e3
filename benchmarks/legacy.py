"""The attention path as it was before this benchmark's optimisations, for before/after rows.

``legacy_attention()`` swaps it in for the duration of a ``with`` block: kv heads repeated with
``repeat_interleave`` before RoPE, RoPE tables covering the patches only (q/k split into prefix
and patches and concatenated back in every layer), three separate q/k/v projections. Outputs
are bit-identical to the current path (checked by ``forward.py``'s check).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

import sapiens2_cli.models.backbone as backbone_module
from sapiens2_cli.models.attention import GroupedQueryAttention
from sapiens2_cli.models.rope import apply_rope


def _forward(self: GroupedQueryAttention, x: torch.Tensor, rope=None) -> torch.Tensor:  # noqa: ANN001
    if self.fused:
        raise RuntimeError("the legacy path has separate q/k/v projections: load without fusing")
    b, n, dim = x.shape
    q = self.wq(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
    k = self.wk(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
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
    out = F.scaled_dot_product_attention(q, k, v)
    out = self.proj(out.transpose(1, 2).reshape(b, n, dim))
    return self.gamma(out) if self.gamma is not None else out


def _patches_only(sin: torch.Tensor, cos: torch.Tensor, prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    return sin, cos


@contextlib.contextmanager
def legacy_attention() -> Iterator[None]:
    saved = GroupedQueryAttention.forward, backbone_module.with_prefix
    GroupedQueryAttention.forward = _forward
    backbone_module.with_prefix = _patches_only
    try:
        yield
    finally:
        GroupedQueryAttention.forward, backbone_module.with_prefix = saved


def _rope_in_model_dtype(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """RoPE as transformers' Sapiens2 applies it in float32: in the activations' dtype, no bf16 casts."""
    sin, cos = sin.to(x.dtype), cos.to(x.dtype)
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


@contextlib.contextmanager
def rope_in_model_dtype() -> Iterator[None]:
    """For timing only: what the official bf16 RoPE costs a float32 forward (outputs move ~1e-3)."""
    import sapiens2_cli.models.attention as attention_module

    saved = attention_module.apply_rope
    attention_module.apply_rope = _rope_in_model_dtype
    try:
        yield
    finally:
        attention_module.apply_rope = saved
