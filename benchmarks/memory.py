"""Peak memory of one forward, each implementation in a fresh process (CPU: resident set size).

A process that already ran a forward keeps freed memory in its allocator and reuses it, so the
resident-set growth of a later call understates its needs; this script measures every
(implementation, dtype) in its own process instead:

* ``weights``: bytes of the parameters and buffers the model holds (made resident before the
  forward: a float32 load keeps them as views of the file's pages until they are first read);
* ``activations``: the high-water mark of the first forward above the loaded state;
* ``total``: the high-water mark of the process during that forward (Python, torch, weights
  and activations; the loading's own transient peak is not counted).

On a GPU (``--device cuda``) the same columns come from the CUDA allocator.

    python benchmarks/memory.py --size 0.4b --part task --impl ours-fused,hf --dtype fp32,bf16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import SIZES, _proc_kib, append_jsonl, random_checkpoint  # noqa: E402

MIB = 2**20


def child(spec: dict) -> dict:
    """Load one implementation, run one forward, report memory in MiB."""
    from forward import DTYPES, Models

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    size = (spec["height"], spec["width"])
    cuda = device.type == "cuda"
    models = Models(Path(spec["ckpt"]), device, size, compile_mode=None)
    run = models.runner(spec["impl"], spec["dtype"])
    if spec["impl"] == "hf":  # keep only what transformers' model holds
        models.cache = {k: v for k, v in models.cache.items() if k[0] == "hf"}
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for m in models.cache.values()
        for t in [*m.parameters(), *m.buffers()]
    }
    x = torch.randn(spec["batch"], 3, *size).to(device, DTYPES[spec["dtype"]])
    with torch.inference_mode():  # fault in weights still mapped from the file (a float32 load
        for m in models.cache.values():  # keeps them as views of its pages): they are weights,
            for t in [*m.parameters(), *m.buffers()]:  # not activations
                t.sum()
    if cuda:
        torch.cuda.synchronize(device)
        loaded = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # forget the loading's own high-water mark
        loaded = _proc_kib("VmRSS") * 1024
    with torch.inference_mode():
        run(x)
    peak = torch.cuda.max_memory_allocated(device) if cuda else _proc_kib("VmHWM") * 1024
    return {
        "weights_mib": sum(storages.values()) / MIB,
        "activations_mib": (peak - loaded) / MIB,
        "total_mib": peak / MIB,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="0.1b", choices=sorted(SIZES))
    p.add_argument("--part", default="backbone", choices=("backbone", "task"))
    p.add_argument("--task", default="seg", choices=("seg", "pose"))
    p.add_argument("--impl", default="ours-fused,hf")
    p.add_argument("--dtype", default="fp32,bf16")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--cache", type=Path, default=Path("/tmp/sapiens2-bench"))
    p.add_argument("--out", type=Path, default=None, help="append JSON lines here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(json.loads(args.child))))
        return []
    task = args.task if args.part == "task" else "pretrain"
    ckpt = random_checkpoint(task, args.size, args.cache)
    records = []
    print(f"# {args.size} {task} {args.height}x{args.width}, batch {args.batch}, {args.device}")
    print("| impl | dtype | weights MiB | activations MiB | total MiB |\n|---|---|---|---|---|")
    for dtype in args.dtype.split(","):
        for impl in args.impl.split(","):
            spec = dict(ckpt=str(ckpt), impl=impl, dtype=dtype, batch=args.batch, height=args.height,
                        width=args.width, device=args.device, threads=args.threads)  # fmt: skip
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
            out = subprocess.run(
                [sys.executable, __file__, "--child", json.dumps(spec)],
                capture_output=True, text=True, env=env, check=False,
            )  # fmt: skip
            if out.returncode != 0:
                raise SystemExit(f"{impl} {dtype}: the measuring process failed:\n{out.stderr[-2000:]}")
            rec = {"size": args.size, "part": args.part, "task": task, **spec, **json.loads(out.stdout.splitlines()[-1])}
            records.append(rec)
            print(f"| {impl} | {dtype} | {rec['weights_mib']:.0f} | {rec['activations_mib']:.0f} | {rec['total_mib']:.0f} |",
                  flush=True)  # fmt: skip
            if args.out is not None:
                append_jsonl(args.out, rec)
    return records


if __name__ == "__main__":
    main()
