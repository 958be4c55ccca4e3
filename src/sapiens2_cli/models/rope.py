"""2-D rotary position embedding, computed exactly as the official model does: in bfloat16.

Coordinates are patch centres normalised per axis to [-1, 1]; angles ``2*pi*coord/period``
are laid out ``[h-angles, w-angles]`` and tiled twice; coordinates, angles, sin and cos are
all rounded to bfloat16 at every step, and q/k are rotated in bfloat16. Reproducing this
rounding is what makes outputs match the released models (fp32 RoPE moves features by ~1e-3).
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

ROPE_DTYPE = torch.bfloat16


def rope_periods(head_dim: int, base: float = 100.0) -> torch.Tensor:
    """The periods buffer ``[head_dim // 4]``: ``base ** (2i / (head_dim/2))`` evaluated in bf16."""
    steps = torch.arange(head_dim // 4, dtype=ROPE_DTYPE)
    return base ** (2 * steps / (head_dim // 2))


class RopePositionEmbedding(nn.Module):
    """Holds the bf16 ``periods`` buffer and builds ``(sin, cos)`` tables ``[h*w, head_dim]``.

    Tables are cached per grid size, device and periods version (they depend on nothing else).
    """

    def __init__(self, head_dim: int, base: float = 100.0) -> None:
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"RoPE needs a head dimension divisible by 4, got {head_dim}")
        self.head_dim = head_dim
        self.register_buffer("periods", rope_periods(head_dim, base), persistent=True)
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module signature
        # Keep the periods in bf16 whatever ``model.to(dtype)`` asks for; drop cached tables.
        super()._apply(fn, recurse)
        if self.periods.dtype != ROPE_DTYPE and not self.periods.is_meta:
            self.periods = self.periods.to(ROPE_DTYPE)
        self._cache.clear()
        return self

    def forward(self, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sin, cos)``, each ``[h*w, head_dim]`` bf16, tokens row-major."""
        if torch.compiler.is_compiling():
            # traced (torch.compile / torch.export): fake tensors have no data pointer to key on
            return self.tables(h, w)
        periods = self.periods
        # inference tensors (a model loaded under torch.inference_mode) keep no version counter
        version = None if periods.is_inference() else periods._version
        key = (h, w, periods.device, version, periods.data_ptr())
        cached = self._cache.get(key)
        if cached is None:
            cached = self._cache[key] = self.tables(h, w)
        return cached

    def tables(self, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sin, cos)`` for an ``h x w`` patch grid, computed afresh (no cache, no autocast)."""
        with no_autocast(self.periods.device):
            return self._tables(h, w)

    def _tables(self, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        dd = {"device": self.periods.device, "dtype": ROPE_DTYPE}
        ys = torch.arange(0.5, h, **dd) / h  # [h]
        xs = torch.arange(0.5, w, **dd) / w  # [w]
        coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).flatten(0, 1)  # [N, 2]
        coords = 2.0 * coords - 1.0
        angles = 2 * math.pi * coords[:, :, None] / self.periods[None, None, :]  # [N, 2, d/4]
        angles = angles.flatten(1, 2).tile(2)  # [N, d]
        return torch.sin(angles), torch.cos(angles)


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast switched off on ``device`` (a no-op where autocast does not exist, e.g. meta)."""
    if device.type in ("cpu", "cuda", "mps", "xpu"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def round_bf16(x: torch.Tensor) -> torch.Tensor:
    """Round ``x`` to the nearest bfloat16 value (ties to even), keeping ``x``'s dtype."""
    return x.to(ROPE_DTYPE).to(x.dtype)


def with_prefix(sin: torch.Tensor, cos: torch.Tensor, prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tables for ``prefix`` unrotated tokens followed by the patches: ``[..., prefix + N, d]``.

    The prefix rows are the identity rotation (``sin = 0``, ``cos = 1``): ``x * 1 + r * 0`` is
    ``x`` exactly in bf16 (and in the float32-with-rounding form), so rotating every token with
    these tables gives the same values as rotating the patches alone, without slicing the
    patches out and concatenating the prefix back in every layer.
    """
    shape = (*sin.shape[:-2], prefix, sin.shape[-1])
    with no_autocast(sin.device):  # bf16 tables: autocast must not re-type them
        zeros = sin.new_zeros(shape)
        return torch.cat([zeros, sin], dim=-2), torch.cat([zeros + 1, cos], dim=-2)


def apply_rope(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Rotate the last ``N = sin.shape[-2]`` tokens of ``x`` ``[B, heads, n, d]`` in bf16.

    The prefix tokens (cls, storage) are not rotated but still pass through the bf16 cast,
    as in the official model. Returns ``x``'s dtype. Tables covering all ``n`` tokens (see
    ``with_prefix``) skip the split into prefix and patches.

    With bf16 tables the arithmetic runs in bf16 (eager). With float32 tables holding bf16
    values (what ``export`` bakes into graphs for runtimes without bf16 arithmetic kernels,
    such as onnxruntime on CPU) the same arithmetic runs in float32 with a rounding to bf16
    after every operation. Both give bit-identical results: a product of two bf16 values is
    exact in float32, and a bf16 add is itself a float32 add rounded to bf16.
    """
    if sin.dtype == torch.float32:
        return _apply_rope_rounded(x, sin, cos)
    dtype = x.dtype
    # The rotation is bf16 by design: autocast (fp16 in particular) must not re-type it.
    with no_autocast(x.device):
        x = x.to(sin.dtype)
        prefix = x.shape[-2] - sin.shape[-2]
        if prefix == 0:
            return (x * cos + _rotate_half(x) * sin).to(dtype)
        patches = x[:, :, prefix:]
        rotated = patches * cos + _rotate_half(patches) * sin
        return torch.cat([x[:, :, :prefix], rotated], dim=-2).to(dtype)


def _apply_rope_rounded(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """``apply_rope`` in float32 with explicit bf16 rounding (tables float32, bf16-valued)."""
    dtype = x.dtype
    with no_autocast(x.device):
        x = round_bf16(x.float())
        prefix = x.shape[-2] - sin.shape[-2]
        patches = x[:, :, prefix:]
        rotated = round_bf16(round_bf16(patches * cos) + round_bf16(_rotate_half(patches) * sin))
        if prefix == 0:
            return rotated.to(dtype)
        return torch.cat([x[:, :, :prefix], rotated], dim=-2).to(dtype)
