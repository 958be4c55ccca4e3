"""Peak memory and time of ``sapiens2 predict`` against frame size: whole-frame, tiled and 4K-native.

Each configuration runs in a fresh process: the real run (:func:`~sapiens2_cli.predict.run_predict`,
what the command line calls) on one JPEG frame of 1K (1024x768), 2K (2048x1536) or 4K
(4096x3072) pixels (H x W), one reader thread, batch 1. Reported per configuration:

* ``peak``: the process's peak resident memory (``ru_maxrss``);
* ``frame``: ``peak`` minus the resident memory once the model is loaded (the memory the frame
  itself costs: decoded image, model activations, outputs, blending, encoding);
* ``seconds``: the run's processing time (model loading excluded), and its forward part.

Modes: ``off`` resizes the frame to the 1024x768 model input and the output back (the official
path); ``tiled`` runs 1024x768 tiles at the frame's own resolution (``--tile 1024x768``, default
overlap 192); ``native`` runs a backbone with the windowed 4K tokenizer at the frame's size
(``--task pretrain``, features only). Models are small with random weights (memory and time
depend on shapes only): a 256-wide, 4-layer backbone with the released head topologies at
narrow widths (the heads still run at full input resolution, as the released ones do).

Example (the numbers in BENCHMARKS.md)::

    python benchmarks/predict_4k.py --tasks seg normal pretrain
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

SIZES = {"1K": (1024, 768), "2K": (2048, 1536), "4K": (4096, 3072)}
INPUT = (1024, 768)
PHOTO = Path(__file__).resolve().parents[1] / "tests" / "data" / "grace_hopper.jpg"


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def build_model(task: str, native: bool, input_hw: tuple[int, int], path: Path) -> Path:
    import torch

    from predict_overhead import small_head
    from sapiens2_cli.models.arch import make_arch
    from sapiens2_cli.models.sapiens2 import ModelInfo, Sapiens2Model
    from sapiens2_cli.weights import save_model

    arch = make_arch(256, 4, 4, use_tokenizer=native, num_tokenizer_layers=2 if native else 0)
    head = None if task == "pretrain" else small_head(task, 256)
    torch.manual_seed(0)
    model = Sapiens2Model(task, arch, head).eval()
    model.info = ModelInfo(task=task, arch=arch, head=head, input_size=input_hw)
    return save_model(model, path)


def child(spec: dict) -> None:
    """One configuration, in this process: prints a JSON line."""
    import cv2
    import torch

    from sapiens2_cli.plan import PredictOptions
    from sapiens2_cli.predict import run_predict
    from sapiens2_cli.weights import load_model

    torch.set_num_threads(spec["threads"])
    folder = Path(spec["folder"])
    h, w = SIZES[spec["size"]]
    image = folder / f"frame_{spec['size']}.jpg"
    if not image.exists():
        cv2.imwrite(str(image), cv2.resize(cv2.imread(str(PHOTO)), (w, h), interpolation=cv2.INTER_CUBIC))
    native = spec["mode"] == "native"
    input_hw = (h, w) if native else INPUT
    model = build_model(spec["task"], native, input_hw, folder / f"{spec['task']}-{spec['mode']}-{spec['size']}.safetensors")
    load_model(model)  # the page cache and allocator see the weights once before the baseline
    baseline = rss_bytes()
    options = PredictOptions(
        inputs=(str(image),), output=folder / f"out-{spec['task']}-{spec['mode']}-{spec['size']}",
        checkpoints=(f"{spec['task']}={model}",), tasks=(spec["task"],), workers=1, batch_size=1,
        device="cpu", tile=INPUT if spec["mode"] == "tiled" else "off", overwrite=True, quiet=True,
    )  # fmt: skip
    record = run_predict(options)
    assert record.ok == 1, record.failures
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({**spec, "peak": peak, "baseline": baseline, "frame": peak - baseline,
                      "seconds": record.processing_s, "forward": record.timings["forward"],
                      "tile_blend": record.timings["tile_blend"]}))  # fmt: skip


def configurations(tasks: list[str]) -> list[tuple[str, str, str]]:
    out = []
    for task in tasks:
        if task == "pretrain":
            out += [(task, "off", s) for s in SIZES] + [(task, "native", s) for s in ("2K", "4K")]
        else:
            out += [(task, "off", s) for s in SIZES] + [(task, "tiled", s) for s in ("2K", "4K")]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["seg", "normal", "pretrain"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for task, mode, size in configurations(args.tasks):
            spec = {"task": task, "mode": mode, "size": size, "folder": folder, "threads": args.threads}
            done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                  text=True, check=True)  # fmt: skip
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{task:9s} {mode:7s} {size}  peak {row['peak'] / 2**20:7.0f} MiB  frame {row['frame'] / 2**20:7.0f} MiB"
                  f"  {row['seconds']:7.2f} s (forward {row['forward']:.2f} s, blend {row['tile_blend']:.2f} s)", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
