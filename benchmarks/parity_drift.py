"""How far each inference variant moves the official outputs: max |diff| per parity fixture case.

Variants: the shipped eager path (fused q/k/v), separate q/k/v, the pre-optimisation attention
path (``legacy.py``), ``compile_model``, and plain ``torch.compile`` (which loses the bf16 RoPE
rounding). Prints a markdown table next to each case's atol.

    SAPIENS2_FIXTURES=/work/shared/fixtures python benchmarks/parity_drift.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from legacy import legacy_attention  # noqa: E402

from sapiens2_cli import load_model  # noqa: E402
from sapiens2_cli.models.compiled import compile_model  # noqa: E402

VARIANTS = ("fused", "separate", "legacy", "compile_model", "torch.compile")


def run_variant(variant: str, path: Path, x: torch.Tensor) -> torch.Tensor:
    model = load_model(path, fuse_qkv=variant not in ("separate", "legacy"))
    torch._dynamo.reset()  # a fresh compilation per case (past 8 recompiles dynamo runs eager)
    if variant == "compile_model":
        model = compile_model(model)
    elif variant == "torch.compile":
        model = torch.compile(model, dynamic=False)
    with torch.inference_mode():
        if variant == "legacy":
            with legacy_attention():
                out = model(x)
        else:
            out = model(x)
    return out[0] if isinstance(out, tuple) else out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fixtures", type=Path, default=Path(os.environ.get("SAPIENS2_FIXTURES", "fixtures")))
    p.add_argument("--variants", default=",".join(VARIANTS))
    args = p.parse_args(argv)
    variants = args.variants.split(",")
    cases = sorted(c for c in (args.fixtures / "parity").iterdir() if (c / "model.safetensors").is_file())
    if not cases:
        raise SystemExit(f"{args.fixtures}/parity: no Sapiens2 parity case")
    print("| case | atol | " + " | ".join(variants) + " |")
    print("|---|---|" + "---|" * len(variants))
    for case in cases:
        cfg = json.loads((case / "config.json").read_text())
        io = load_file(case / "io.safetensors")
        cells = []
        for variant in variants:
            out = run_variant(variant, case / "model.safetensors", io["input"])
            diff = (out - io["output"]).abs().max().item()
            ok = torch.isclose(out, io["output"], atol=cfg["atol"], rtol=cfg["rtol"]).all().item()
            mark = "" if ok else " (fails)"
            cells.append(f"{diff:.2g}{mark}")
        print(f"| {case.name} | {cfg['atol']:g} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
