"""``torch.compile`` for Sapiens2 models without losing the official bf16 RoPE rounding.

By default inductor computes a chain of bf16 elementwise ops in float32 registers and rounds
once at the end. RoPE's rotation is such a chain, and the official model rounds after every
operation; fused, the features move by ~5e-3 and the parity fixtures fail by 25x. Inductor's
``emulate_precision_casts`` keeps every intermediate rounding, and the compiled model stays
within the fixtures' tolerances.
"""

from __future__ import annotations

import torch
from torch import nn

KEEP_ROUNDING = {"emulate_precision_casts": True}


def compile_model(model: nn.Module, *, mode: str | None = None, dynamic: bool | None = False) -> nn.Module:
    """``torch.compile(model)`` with the bf16 rounding kept; the first call compiles.

    Args:
        mode: a ``torch.compile`` mode (``"reduce-overhead"`` adds CUDA graphs on a GPU,
            ``"max-autotune"`` searches GEMM kernels); None for the default.
        dynamic: False compiles one graph per input shape (the fastest code for a fixed
            input size); None lets torch mark sizes dynamic after a second shape.
    """
    from torch._inductor import list_mode_options

    options = {**list_mode_options(mode), **KEEP_ROUNDING} if mode else dict(KEEP_ROUNDING)
    return torch.compile(model, dynamic=dynamic, options=options)
