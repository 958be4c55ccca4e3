"""Operator table of one forward (torch.profiler), with the shares that decide the dtype gains.

Prints the top operators by self time, then the share of the whole forward taken by each
stage: linear layers (GEMMs), attention (SDPA), RoPE (the bf16 casts and rotation, labelled
with ``record_function``), RMSNorm, convolutions, and everything else.

    python benchmarks/profile_ops.py --size 0.4b --dtype fp32
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import SIZES, environment, random_checkpoint  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# eager: stage -> operator whose CPU total (children included) measures it
STAGES = {
    "linear (GEMM)": "aten::linear",
    "attention (SDPA)": "aten::scaled_dot_product_attention",
    "RoPE (casts + rotation)": "rope",
    "RMSNorm": "aten::rms_norm",
    "convolution (patch embed, head)": "aten::convolution",
}
# compiled (no module-level operators left): stage -> pattern on the operators' names, self time
KERNELS = {
    "GEMM": r"addmm|\bmm\b|aten::mm|bmm|linear",
    "attention (SDPA)": r"flash_attention|scaled_dot_product",
    "convolution": r"convolution",
    "fused elementwise kernels": r"cpp_fused|graph_\d|kernel",
}


@contextlib.contextmanager
def labelled_rope() -> Iterator[None]:
    """Label every ``apply_rope`` call ``rope`` in the trace."""
    import sapiens2_cli.models.attention as attention

    original = attention.apply_rope

    def apply_rope(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        with record_function("rope"):
            return original(x, sin, cos)

    attention.apply_rope = apply_rope
    try:
        yield
    finally:
        attention.apply_rope = original


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="0.4b", choices=sorted(SIZES))
    p.add_argument("--task", default="pretrain", choices=("pretrain", "seg", "pose"))
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--fused", action="store_true", help="fuse_qkv() first")
    p.add_argument("--compiled", action="store_true", help="compile_model() first (fused)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--rows", type=int, default=15)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cache", type=Path, default=Path("/tmp/sapiens2-bench"))
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    from sapiens2_cli import load_model

    ckpt = random_checkpoint(args.task, args.size, args.cache)
    model = load_model(ckpt, dtype=DTYPES[args.dtype], fuse_qkv=args.fused or args.compiled)
    run = model
    if args.compiled:
        from sapiens2_cli.models.compiled import compile_model

        run = compile_model(model)
    x = torch.randn(args.batch, 3, args.height, args.width).to(DTYPES[args.dtype])
    env = environment(torch.device("cpu"))
    labels = contextlib.nullcontext() if args.compiled else labelled_rope()
    with torch.inference_mode(), labels:
        t0 = time.perf_counter()
        run(x)  # warm-up (and compile)
        warm = time.perf_counter() - t0
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            run(x)
            wall = time.perf_counter() - t0
    events = prof.key_averages()
    variant = "compiled" if args.compiled else "fused" if args.fused else "eager"
    print(f"# {args.size} {args.task} {args.dtype} {variant}, batch {args.batch}, {args.height}x{args.width}: "
          f"profiled forward {wall:.2f} s (warm-up {warm:.2f} s); {env['threads']} threads, "
          f"load {env['loadavg_1m']:.2f} -> {os.getloadavg()[0]:.2f}, torch {env['torch']}")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))
    total = sum(e.self_cpu_time_total for e in events)
    print("| stage | CPU s | share |\n|---|---|---|")
    covered = 0.0
    if args.compiled:
        for stage, pattern in KERNELS.items():
            spent = sum(e.self_cpu_time_total for e in events if re.search(pattern, e.key))
            covered += spent
            print(f"| {stage} | {spent / 1e6:.2f} | {100 * spent / total:.1f}% |")
    else:
        by_name = {e.key: e for e in events}
        for stage, op in STAGES.items():
            spent = by_name[op].cpu_time_total if op in by_name else 0.0
            covered += spent
            print(f"| {stage} | {spent / 1e6:.2f} | {100 * spent / total:.1f}% |")
    print(f"| everything else | {(total - covered) / 1e6:.2f} | {100 * (total - covered) / total:.1f}% |")

if __name__ == "__main__":
    main()
