"""Forward-pass throughput: our Sapiens2 against transformers' Sapiens2 on the same weights.

Every implementation runs the same random weights (written once in the released layout and
read back with ``load_model``) on the same input. Runs are interleaved round by round
(ours, peer, ours, peer, ...) so that a change in machine load hits all of them alike.
Before timing, each implementation's warm-up output is compared with ours in float32, and
transformers is shown to match ours exactly once its float32 RoPE is swapped for the official
bf16 one (the only numerical difference between the two).

Implementations (``--impl``):
  ours           load_model(fuse_qkv=False): SDPA with grouped kv heads, RoPE tables covering
                 all tokens
  ours-fused     load_model() as shipped: ... plus one q/k/v projection per layer
  ours-compiled  ... plus compile_model (torch.compile keeping the bf16 RoPE rounding; static
                 shapes; compile time reported separately)
  ours-legacy    the attention path before these optimisations (benchmarks/legacy.py)
  hf             transformers Sapiens2Model / Sapiens2For* with SDPA attention
  hf-compiled    ... under plain torch.compile (static shapes)
  ours-rope32, ours-compiled-rope32
                 ours-fused / ours-compiled with RoPE in the activations' dtype, as transformers
                 does in float32 (timing only: what the official bf16 RoPE costs; outputs move)

Dtypes (``--dtype``): fp32; bf16 / fp16 (weights and activations, ``load_model(dtype=...)``;
RoPE stays bf16 arithmetic); autocast (fp32 weights, ``torch.autocast`` to bf16).

On a GPU pass ``--device cuda --batch 1,2,4,8,16,32``: the same code adds the allocator's peak
memory and achieved TFLOP/s against a measured bf16 / fp32 matmul peak.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (  # noqa: E402
    SIZES,
    Timing,
    append_jsonl,
    environment,
    matmul_peak,
    model_flops,
    random_checkpoint,
    sync,
)

IMPLS = ("ours", "ours-fused", "ours-compiled", "ours-legacy", "hf", "hf-compiled", "ours-rope32",
         "ours-compiled-rope32")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "autocast": torch.float32}
COMPUTE = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16", "autocast": "bf16"}  # matmul dtype
Runner = Callable[[torch.Tensor], torch.Tensor]


def _csv(kind: Callable[[str], object]) -> Callable[[str], list]:
    return lambda text: [kind(v) for v in text.split(",") if v]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="0.1b", choices=sorted(SIZES))
    p.add_argument("--part", default="backbone", choices=("backbone", "task"))
    p.add_argument("--task", default="seg", choices=("seg", "pose"), help="task model for --part task")
    p.add_argument("--impl", type=_csv(str), default=["ours", "hf"])
    p.add_argument("--dtype", type=_csv(str), default=["fp32"])
    p.add_argument("--batch", type=_csv(int), default=[1])
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3, help="timed rounds")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--compile-mode", default=None, help="torch.compile mode for ours-compiled")
    p.add_argument("--no-check", action="store_true", help="skip the output comparisons")
    p.add_argument("--no-peak", action="store_true", help="skip the matmul peak measurement")
    p.add_argument("--cache", type=Path, default=Path("/tmp/sapiens2-bench"), help="random checkpoints")
    p.add_argument("--out", type=Path, default=None, help="append JSON lines here")
    args = p.parse_args(argv)
    for impl in args.impl:
        if impl not in IMPLS:
            p.error(f"unknown --impl {impl!r}; choose from {', '.join(IMPLS)}")
    for dtype in args.dtype:
        if dtype not in DTYPES:
            p.error(f"unknown --dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    return args


# --------------------------------------------------------------------------- implementations


def _with_rope32(inner: Runner) -> Runner:
    from legacy import rope_in_model_dtype

    def run(x: torch.Tensor) -> torch.Tensor:
        with rope_in_model_dtype():
            return inner(x)

    return run


class Models:
    """Loads each (dtype, fused) model once; transformers' models share our tensors."""

    def __init__(self, ckpt: Path, device: torch.device, input_size: tuple[int, int], *, compile_mode: str | None):
        self.ckpt, self.device, self.input_size = ckpt, device, input_size
        self.compile_mode = compile_mode
        self.cache: dict[tuple, torch.nn.Module] = {}

    def ours(self, dtype: torch.dtype, *, fused: bool = False) -> torch.nn.Module:
        from sapiens2_cli import load_model

        key = ("ours", dtype, fused)
        if key not in self.cache:
            model = load_model(self.ckpt, device=self.device, dtype=dtype, fuse_qkv=fused)
            self.cache[key] = model
        return self.cache[key]

    def hf(self, dtype: torch.dtype) -> torch.nn.Module:
        from hf_port import hf_model

        key = ("hf", dtype)
        if key not in self.cache:
            self.cache[key] = hf_model(self.ours(dtype), self.input_size)
        return self.cache[key]

    def runner(self, impl: str, dtype_name: str) -> Runner:
        dtype = DTYPES[dtype_name]
        if impl in ("hf", "hf-compiled"):
            from hf_port import hf_forward

            model = self.hf(dtype)
            if impl == "hf-compiled":
                key = ("hf-compiled", dtype)
                if key not in self.cache:
                    self.cache[key] = torch.compile(model, dynamic=False, mode=self.compile_mode)
                model = self.cache[key]
            run: Runner = lambda x: hf_forward(model, x)  # noqa: E731
        elif impl == "ours-legacy":
            from legacy import legacy_attention

            model = self.ours(dtype)

            def run(x: torch.Tensor) -> torch.Tensor:
                with legacy_attention():
                    return model(x)

        elif impl in ("ours-compiled", "ours-compiled-rope32"):
            model = self.ours(dtype, fused=True)
            key = (impl, dtype)
            if key not in self.cache:
                from sapiens2_cli.models.compiled import compile_model

                self.cache[key] = compile_model(model, mode=self.compile_mode)
            run = self.cache[key]
            if impl.endswith("-rope32"):
                run = _with_rope32(run)
        elif impl == "ours-rope32":
            run = _with_rope32(self.ours(dtype, fused=True))
        else:
            run = self.ours(dtype, fused=impl == "ours-fused")
        if dtype_name == "autocast":
            inner = run

            def run(x: torch.Tensor) -> torch.Tensor:
                with torch.autocast(self.device.type, dtype=torch.bfloat16):
                    return inner(x)

        return run


def first_tensor(out: object) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def differences(got: torch.Tensor, want: torch.Tensor) -> dict[str, float]:
    got, want = got.float(), want.float()
    diff = (got - want).abs().max().item()
    return {"max_abs": diff, "max_rel": diff / max(want.abs().max().item(), 1e-30)}


def check_hf_equivalence(models: Models, batch_input: torch.Tensor) -> dict[str, float]:
    """transformers vs ours (fp32, small input): as is, and with the official bf16 RoPE."""
    from hf_port import bf16_rope, hf_forward

    ours, hf = models.ours(torch.float32), models.hf(torch.float32)
    with torch.inference_mode():
        want = first_tensor(ours(batch_input))
        plain = differences(hf_forward(hf, batch_input), want)
        with bf16_rope(ours):
            patched = differences(hf_forward(hf, batch_input), want)
    return {"hf_fp32_rope_max_rel": plain["max_rel"], "hf_bf16_rope_max_abs": patched["max_abs"]}


# --------------------------------------------------------------------------- the run


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    task = args.task if args.part == "task" else "pretrain"
    ckpt = random_checkpoint(task, args.size, args.cache)
    size = (args.height, args.width)
    models = Models(ckpt, device, size, compile_mode=args.compile_mode)
    env = environment(device)
    print(f"# {args.size} {task} {size[0]}x{size[1]} on {env.get('gpu', env['cpu'])}, "
          f"{env['threads']} threads, torch {env['torch']}, load {env['loadavg_1m']:.2f}")

    if "hf" in args.impl and not args.no_check:
        stride = SIZES[args.size].stride
        small = torch.randn(1, 3, 8 * stride, 6 * stride, generator=torch.Generator().manual_seed(1))
        eq = check_hf_equivalence(models, small.to(device))
        print(f"# check: transformers vs ours, fp32 RoPE as shipped: max rel diff {eq['hf_fp32_rope_max_rel']:.2e}; "
              f"with the official bf16 RoPE: max abs diff {eq['hf_bf16_rope_max_abs']:.2e}")
        env.update(eq)

    peaks: dict[str, float] = {}
    if not args.no_peak:
        for dtype_name in args.dtype:
            compute = COMPUTE[dtype_name]
            if compute not in peaks:
                peaks[compute] = matmul_peak(device, DTYPES[compute])
                print(f"# measured {compute} matmul peak: {peaks[compute] / 1e12:.3f} TFLOP/s")

    from sapiens2_cli.models.sapiens2 import Sapiens2Model

    info = models.ours(torch.float32).info
    flops_per_image = model_flops(lambda: Sapiens2Model(info.task, info.arch, info.head), (1, 3, *size))

    records = []
    combos = [(impl, d) for d in args.dtype for impl in args.impl]
    for batch in args.batch:
        gen = torch.Generator().manual_seed(0)
        x32 = torch.randn(batch, 3, *size, generator=gen).to(device)
        inputs = {d: x32.to(DTYPES[d]) for d in args.dtype}
        timings = {c: Timing() for c in combos}
        compile_s: dict[tuple, float] = {}
        reference: torch.Tensor | None = None
        checks: dict[tuple, dict[str, float]] = {}
        with torch.inference_mode():
            for impl, dtype_name in combos:  # warm-up, compile, and output check
                run = models.runner(impl, dtype_name)
                compiled = "-compiled" in impl
                for i in range(max(args.warmup, 1 if compiled else 0)):
                    sync(device)
                    t0 = time.perf_counter()
                    out = first_tensor(run(inputs[dtype_name]))
                    sync(device)
                    if i == 0 and compiled:
                        compile_s[impl, dtype_name] = time.perf_counter() - t0
                    if i == 0 and not args.no_check:
                        if reference is None:
                            reference = out.float()
                            ref_name = f"{impl} {dtype_name}"
                        checks[impl, dtype_name] = differences(out, reference)
                    del out
            for _ in range(args.iters):
                for impl, dtype_name in combos:
                    run = models.runner(impl, dtype_name)
                    timings[impl, dtype_name].add(lambda: run(inputs[dtype_name]), device)
        for (impl, dtype_name), t in timings.items():
            compute = COMPUTE[dtype_name]
            achieved = flops_per_image * batch / t.median
            rec = {
                "size": args.size, "part": args.part, "task": task, "impl": impl, "dtype": dtype_name,
                "batch": batch, "height": size[0], "width": size[1], "device": str(device),
                "wall_s": t.wall, "cpu_s": t.cpu, "median_s": t.median, "min_s": min(t.wall),
                "images_per_s": batch / t.median, "peak_mib": max(t.peak_mib),
                "gflop_per_image": flops_per_image / 1e9, "achieved_tflops": achieved / 1e12,
                "peak_tflops": peaks.get(compute, float("nan")) / 1e12,
                "compile_s": compile_s.get((impl, dtype_name)),
                "check_vs": None if args.no_check else ref_name,
                **{f"check_{k}": v for k, v in checks.get((impl, dtype_name), {}).items()},
                "loadavg_1m_end": os.getloadavg()[0],
                **env,
            }  # fmt: skip
            records.append(rec)
            if args.out is not None:
                append_jsonl(args.out, rec)
        print_table([r for r in records if r["batch"] == batch])
    return records


def print_table(records: list[dict]) -> None:
    """Markdown rows: wall-clock throughput, CPU seconds per image, memory, FLOP rate, check."""
    print("| impl | dtype | batch | s/batch (median of n) | img/s | CPU s/img | peak MiB | TFLOP/s | % of matmul peak | max rel diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in records:
        frac = 100 * r["achieved_tflops"] / r["peak_tflops"] if r["peak_tflops"] == r["peak_tflops"] else float("nan")
        diff = r.get("check_max_rel")
        cpu = statistics.median(r["cpu_s"]) / r["batch"]
        print(
            f"| {r['impl']} | {r['dtype']} | {r['batch']} | {r['median_s']:.2f} ({len(r['wall_s'])}) | "
            f"{r['images_per_s']:.3f} | {cpu:.2f} | {r['peak_mib']:.0f} | {r['achieved_tflops']:.3f} | "
            f"{frac:.0f} | {'' if diff is None else f'{diff:.1e}'} |"
        )
        if r.get("compile_s") is not None:
            print(f"|   (compile + first call {r['compile_s']:.1f} s) | | | | | | | | | |")
    sys.stdout.flush()

if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
