"""Backbone architectures: the released sizes, and inference of an architecture from tensor shapes."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

GQA_FULL_LAYERS = 8  # the first and last 8 blocks use full multi-head attention


@dataclasses.dataclass(frozen=True)
class BackboneArch:
    """Every number that shapes a Sapiens2 backbone.

    ``kv_heads`` lists the key/value heads of each block (``num_heads`` for the first and last
    eight blocks, ``num_heads / 2`` in between for the released sizes).
    """

    embed_dims: int
    num_layers: int
    num_heads: int
    feedforward_channels: int
    kv_heads: tuple[int, ...]
    patch_size: int = 16
    in_channels: int = 3
    n_storage_tokens: int = 8
    use_qk_norm: bool = True
    qkv_bias: bool = True
    rope_base: float = 100.0
    use_tokenizer: bool = False
    num_tokenizer_layers: int = 0
    window_size: int = 4
    tokenizer_ffn: int = 0

    def __post_init__(self) -> None:
        if len(self.kv_heads) != self.num_layers:
            raise ValueError(f"kv_heads has {len(self.kv_heads)} entries for {self.num_layers} layers")

    @property
    def head_dim(self) -> int:
        return self.embed_dims // self.num_heads

    @property
    def stride(self) -> int:
        """Input pixels per feature-map cell: 16, or 64 with the 4K tokenizer."""
        return self.patch_size * (self.window_size if self.use_tokenizer else 1)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["kv_heads"] = list(self.kv_heads)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> BackboneArch:
        d = dict(d)
        d["kv_heads"] = tuple(d["kv_heads"])
        return cls(**d)


def official_kv_heads(num_layers: int, num_heads: int) -> tuple[int, ...]:
    """Full attention in the first and last 8 layers, half the kv heads in between."""
    return tuple(
        num_heads // 2 if GQA_FULL_LAYERS <= i < num_layers - GQA_FULL_LAYERS else num_heads
        for i in range(num_layers)
    )


def make_arch(
    embed_dims: int,
    num_layers: int,
    num_heads: int,
    feedforward_channels: int | None = None,
    *,
    use_tokenizer: bool = False,
    num_tokenizer_layers: int = 0,
    window_size: int = 4,
) -> BackboneArch:
    """An architecture following the official rules (GQA layout, FFN 4*D, tokenizer FFN 4*D)."""
    return BackboneArch(
        embed_dims=embed_dims,
        num_layers=num_layers,
        num_heads=num_heads,
        feedforward_channels=feedforward_channels or 4 * embed_dims,
        kv_heads=official_kv_heads(num_layers, num_heads),
        use_tokenizer=use_tokenizer,
        num_tokenizer_layers=num_tokenizer_layers if use_tokenizer else 0,
        window_size=window_size,
        tokenizer_ffn=4 * embed_dims if use_tokenizer else 0,
    )


ARCHS: dict[str, BackboneArch] = {
    "0.1b": make_arch(768, 12, 12),
    "0.4b": make_arch(1024, 24, 16),
    "0.8b": make_arch(1280, 32, 16),
    "1b": make_arch(1536, 40, 24),
    "5b": make_arch(2432, 56, 32),
    "1b-4k": make_arch(1536, 40, 24, use_tokenizer=True, num_tokenizer_layers=4),
}

Shapes = Mapping[str, Sequence[int]]


def _indices(shapes: Shapes, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in shapes if (m := rx.fullmatch(k))})


def infer_arch(shapes: Shapes) -> BackboneArch:
    """The backbone architecture implied by a bare backbone state dict's tensor shapes.

    Raises ``KeyError`` naming the first tensor a Sapiens2 backbone must have but lacks.
    """
    for required in ("cls_token", "storage_tokens", "patch_embed.projection.weight", "ln1.weight"):
        if required not in shapes:
            raise KeyError(required)
    dim = shapes["cls_token"][-1]
    layers = _indices(shapes, r"blocks\.(\d+)\.ln1\.weight")
    if layers != list(range(len(layers))) or not layers:
        raise KeyError("blocks.0.ln1.weight" if not layers else f"blocks.{len(layers)}")
    qk_norm = "blocks.0.attn.q_norm.weight" in shapes
    if qk_norm:
        head_dim = shapes["blocks.0.attn.q_norm.weight"][0]
    elif "rope_embed.periods" in shapes:
        head_dim = 4 * shapes["rope_embed.periods"][0]
    else:
        raise KeyError("blocks.0.attn.q_norm.weight")
    heads = dim // head_dim
    kv = tuple(shapes[f"blocks.{i}.attn.wk.weight"][0] // head_dim for i in layers)
    patch = shapes["patch_embed.projection.weight"]
    tok_layers = _indices(shapes, r"tokenizer\.blocks\.(\d+)\.ln1\.weight")
    use_tokenizer = "tokenizer.w_cls" in shapes
    window = 4
    if use_tokenizer:
        window = round((shapes["tokenizer.local_pos_embed"][1] - 1) ** 0.5)
    return BackboneArch(
        embed_dims=dim,
        num_layers=len(layers),
        num_heads=heads,
        feedforward_channels=shapes["blocks.0.ffn.w3.weight"][1],
        kv_heads=kv,
        patch_size=patch[-1],
        in_channels=patch[1],
        n_storage_tokens=shapes["storage_tokens"][1],
        use_qk_norm=qk_norm,
        qkv_bias="blocks.0.attn.wq.bias" in shapes,
        use_tokenizer=use_tokenizer,
        num_tokenizer_layers=len(tok_layers),
        window_size=window,
        tokenizer_ffn=shapes["tokenizer.blocks.0.ffn.w3.weight"][1] if tok_layers else 0,
    )


def size_name(arch: BackboneArch) -> str | None:
    """The released size an architecture equals (``"1b-4k"``, ``"0.4b"``...), or None."""
    for name, known in ARCHS.items():
        if known == dataclasses.replace(arch, rope_base=known.rope_base):
            return name
    return None
