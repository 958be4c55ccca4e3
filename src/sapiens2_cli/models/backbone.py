"""The Sapiens2 vision transformer and its windowed 4K tokenizer."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from sapiens2_cli.models.arch import BackboneArch
from sapiens2_cli.models.attention import GroupedQueryAttention
from sapiens2_cli.models.layers import SwiGLUFFN, rms_norm
from sapiens2_cli.models.rope import RopePositionEmbedding, with_prefix

NUM_PREFIX_CLS = 1
TOKENIZER_CHUNK = 1024  # windows per tokenizer pass: bounds memory at 4K input


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln1(x))`` then ``x + ffn(ln2(x))``."""

    def __init__(
        self,
        dim: int,
        heads: int,
        kv_heads: int,
        ffn: int,
        *,
        qk_norm: bool = True,
        layer_scale: bool = True,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.ln1 = rms_norm(dim)
        self.attn = GroupedQueryAttention(
            dim, heads, kv_heads, qk_norm=qk_norm, layer_scale=layer_scale, bias=bias
        )
        self.ln2 = rms_norm(dim)
        self.ffn = SwiGLUFFN(dim, ffn, bias=bias)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), rope)
        return x + self.ffn(self.ln2(x))


class WindowTokenizer(nn.Module):
    """Pools each ``ws x ws`` window of patch tokens into one token (the 4K backbone).

    Each window (row-major over the window grid, tokens row-major inside) becomes
    ``[w_cls, tokens] + local_pos_embed``, runs through full-attention blocks without RoPE,
    and its first output token is kept. ``[B, h*w, D] -> [B, (h/ws)*(w/ws), D]``.
    """

    def __init__(self, arch: BackboneArch) -> None:
        super().__init__()
        dim, ws = arch.embed_dims, arch.window_size
        self.window_size = ws
        self.local_pos_embed = nn.Parameter(torch.zeros(1, 1 + ws * ws, dim))
        self.w_cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(
            Block(
                dim,
                arch.num_heads,
                arch.num_heads,
                arch.tokenizer_ffn,
                qk_norm=False,
                layer_scale=False,
                bias=arch.qkv_bias,
            )
            for _ in range(arch.num_tokenizer_layers)
        )

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, _, dim = x.shape
        ws = self.window_size
        if h % ws or w % ws:
            raise ValueError(
                f"the 4K tokenizer needs a patch grid divisible by {ws}, got {h}x{w} "
                f"(input must be a multiple of {16 * ws} pixels)"
            )
        nw = (h // ws) * (w // ws)
        windows = (
            x.view(b, h // ws, ws, w // ws, ws, dim)
            .permute(0, 1, 3, 2, 4, 5)
            .reshape(b, nw, ws * ws, dim)
        )  # [B, nW, ws*ws, D]
        # About TOKENIZER_CHUNK windows per pass. Traced graphs (torch.export) chunk per image
        # so the number of passes depends on the grid only and the batch can stay dynamic.
        per_pass = TOKENIZER_CHUNK if torch.compiler.is_compiling() else max(1, TOKENIZER_CHUNK // b)
        pooled = []
        for chunk in windows.split(per_pass, dim=1):  # [B, c, ws*ws, D]
            seq = chunk.reshape(-1, ws * ws, dim)  # [B*c, ws*ws, D]
            seq = torch.cat([self.w_cls.expand(seq.shape[0], -1, -1), seq], dim=1)
            seq = seq + self.local_pos_embed
            for block in self.blocks:
                seq = block(seq)
            pooled.append(seq[:, 0].view(b, -1, dim))  # [B, c, D]
        return torch.cat(pooled, dim=1)  # [B, nW, D]


class PatchEmbed(nn.Module):
    """Conv ``k = s = patch``: ``[B, 3, H, W] -> [B, D, H/p, W/p]`` (remainder pixels dropped)."""

    def __init__(self, in_channels: int, dim: int, patch: int) -> None:
        super().__init__()
        self.projection = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(x)


class Sapiens2Backbone(nn.Module):
    """Sapiens2 ViT: patch embedding, [cls, storage, patches] tokens, RoPE blocks, final RMSNorm.

    ``forward`` takes a normalised ``[B, 3, H, W]`` image (H, W multiples of 16, or of
    ``16 * window_size`` with the tokenizer) and returns the feature map ``[B, D, h, w]``
    (``h = H/16``, or ``H/(16*ws)`` with the tokenizer). ``forward_tokens`` gives all tokens.
    """

    def __init__(self, arch: BackboneArch) -> None:
        super().__init__()
        self.arch = arch
        dim = arch.embed_dims
        self.num_prefix = NUM_PREFIX_CLS + arch.n_storage_tokens
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.storage_tokens = nn.Parameter(torch.zeros(1, arch.n_storage_tokens, dim))
        self.patch_embed = PatchEmbed(arch.in_channels, dim, arch.patch_size)
        self.rope_embed = RopePositionEmbedding(arch.head_dim, arch.rope_base)
        self.tokenizer = WindowTokenizer(arch) if arch.use_tokenizer else None
        self.blocks = nn.ModuleList(
            Block(
                dim,
                arch.num_heads,
                kv,
                arch.feedforward_channels,
                qk_norm=arch.use_qk_norm,
                bias=arch.qkv_bias,
            )
            for kv in arch.kv_heads
        )
        self.ln1 = rms_norm(dim)  # final norm; the release names it like the blocks' ln1
        self.grad_checkpointing = False

    def forward_tokens(
        self, x: torch.Tensor, keep: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """All tokens after the final norm and the patch grid ``(h, w)``.

        Returns ``[B, 1 + n_storage + N, D]`` with ``N = h*w``, or with ``keep`` (``[B, K]``
        indices of the patch tokens to keep, row-major over the grid after the tokenizer) only
        those ``K`` patch tokens, each rotated with its own grid position: the masked-image
        encoder path of pretraining.
        """
        x = self.patch_embed(x)  # [B, D, h, w]
        b, dim, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # [B, h*w, D]
        if self.tokenizer is not None:
            x = self.tokenizer(x, h, w)
            h, w = h // self.tokenizer.window_size, w // self.tokenizer.window_size
        sin, cos = self.rope_embed(h, w)  # [N, d] each
        if keep is not None:
            x = x.gather(1, keep[..., None].expand(-1, -1, dim))  # [B, K, D]
            sin, cos = sin[keep][:, None], cos[keep][:, None]  # [B, 1, K, d]
        prefix = torch.cat([self.cls_token, self.storage_tokens], dim=1).expand(b, -1, -1)
        x = torch.cat([prefix.to(x.dtype), x], dim=1)
        rope = with_prefix(sin, cos, self.num_prefix)  # [..., prefix + N, d]: every token
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope)
        return self.ln1(x), (h, w)

    def forward(
        self, x: torch.Tensor, out: Literal["featmap", "raw", "cls"] = "featmap"
    ) -> torch.Tensor:
        tokens, (h, w) = self.forward_tokens(x)
        if out == "raw":
            return tokens
        if out == "cls":
            return tokens[:, 0]
        b, _, dim = tokens.shape
        return tokens[:, self.num_prefix :].transpose(1, 2).reshape(b, dim, h, w)
