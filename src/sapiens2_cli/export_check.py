"""The check every export ends with: run the written artifact against the eager model.

Two inputs at the export size: ``random`` (``N(0, 1)`` normalised values, batch 2) and ``real``
(a photo resized to the export size and normalised as the release does, batch 1: two batch
sizes, so a graph that froze the batch fails). For each output the error is

    max_rel = max |artifact - eager| / max |eager|

(the worst element against the output's range) and must not exceed the tolerance of the
artifact's dtype (``tolerance_for``). The eager reference is always the float32 model.
"""

from __future__ import annotations

import dataclasses
from importlib import resources
from pathlib import Path

import torch

from sapiens2_cli.artifact_meta import MEAN_RGB, STD_RGB

# The tolerance on max_rel is max(BASE_TOLERANCES[dtype], FLOOR_FACTORS[dtype] * noise floor),
# where the noise floor is measured on the model being exported, on the same inputs:
# - fp32: the eager model's own response to 1-ulp input noise. Graph rewrites and kernel
#   choices perturb it like that, and the bf16 RoPE amplifies such noise in deep models with
#   q/k-norm weights near 1; on the fixtures an onnxruntime graph deviates 0.2-11x the floor
#   (2e-6..4e-5 relative), while a graph with RoPE in float32 deviates 3e-4..6e-4 and fails.
# - bf16 / fp16: the eager model run in that dtype against float32 (what the dtype costs);
#   pt2 reproduces it exactly and onnxruntime's fp16 kernels stay below it.
BASE_TOLERANCES: dict[str, float] = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}
FLOOR_FACTORS: dict[str, float] = {"fp32": 10.0, "fp16": 2.0, "bf16": 2.0}
RANDOM_BATCH = 2
SEED = 0


@dataclasses.dataclass(frozen=True)
class OutputDiff:
    """How far one output of the artifact is from the eager model's."""

    name: str
    max_abs: float
    max_rel: float  # max_abs / ref_max_abs
    ref_max_abs: float

    def to_dict(self) -> dict[str, float]:
        return {"max_abs": self.max_abs, "max_rel": self.max_rel, "ref_max_abs": self.ref_max_abs}


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """One input's comparison; ``passed`` when every output is within ``tolerance``."""

    input: str
    shape: tuple[int, ...]
    outputs: tuple[OutputDiff, ...]
    tolerance: float

    @property
    def passed(self) -> bool:
        return all(d.max_rel <= self.tolerance for d in self.outputs)  # NaN fails too

    def to_dict(self) -> dict:
        return {
            "input": self.input,
            "shape": list(self.shape),
            "outputs": {d.name: d.to_dict() for d in self.outputs},
            "passed": self.passed,
        }

    def describe(self) -> str:
        parts = [f"{d.name} max|diff| {d.max_abs:.3g} (relative {d.max_rel:.3g})" for d in self.outputs]
        verdict = "ok" if self.passed else "FAILED"
        return (
            f"{self.input} {list(self.shape)}: "
            + ", ".join(parts)
            + f"; tolerance {self.tolerance:g}: {verdict}"
        )


def default_check_image() -> Path:
    """A packaged photo (256x224 crop of scikit-image's public-domain ``astronaut.png``)."""
    return Path(str(resources.files("sapiens2_cli").joinpath("data", "check_image.png")))


def read_pixels(path: str | Path, input_size: tuple[int, int]) -> torch.Tensor:
    """The image at ``path`` resized (stretched) to ``input_size`` ``(H, W)``: RGB 0-255 ``[1, 3, H, W]`` float32."""
    import cv2

    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise FileNotFoundError(f"{path}: cannot read it as an image")
    h, w = input_size
    interp = cv2.INTER_AREA if w < bgr.shape[1] else cv2.INTER_LINEAR
    rgb = cv2.cvtColor(cv2.resize(bgr, (w, h), interpolation=interp), cv2.COLOR_BGR2RGB)
    return torch.from_numpy(rgb).permute(2, 0, 1)[None].float().contiguous()  # [1, 3, H, W]


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """``(pixels - mean) / std`` with the release's RGB mean/std (0-255 scale)."""
    mean = torch.tensor(MEAN_RGB).view(1, 3, 1, 1)
    std = torch.tensor(STD_RGB).view(1, 3, 1, 1)
    return (pixels - mean) / std


def check_inputs(
    input_size: tuple[int, int], image: str | Path | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{name: (normalised input, RGB pixels 0-255)}`` for ``random`` and ``real``, CPU float32."""
    gen = torch.Generator().manual_seed(SEED)
    random = torch.randn(RANDOM_BATCH, 3, *input_size, generator=gen)
    mean = torch.tensor(MEAN_RGB).view(1, 3, 1, 1)
    std = torch.tensor(STD_RGB).view(1, 3, 1, 1)
    pixels = read_pixels(image or default_check_image(), input_size)
    return {"random": (random, random * std + mean), "real": (normalise(pixels), pixels)}


def compare(
    name: str, shape: tuple[int, ...], got, want, names: tuple[str, ...], tolerance: float
) -> CheckResult:
    """Compare artifact outputs ``got`` with eager outputs ``want`` (tensors or tuples of them)."""
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    diffs = []
    for out_name, a, e in zip(names, got, want, strict=True):
        a, e = a.detach().float().cpu(), e.detach().float().cpu()
        if a.shape != e.shape:
            raise ValueError(f"output {out_name}: artifact shape {list(a.shape)}, eager {list(e.shape)}")
        max_abs = (a - e).abs().max().item()
        ref = e.abs().max().item()
        diffs.append(OutputDiff(out_name, max_abs, max_abs / ref if ref > 0 else max_abs, ref))
    return CheckResult(name, tuple(shape), tuple(diffs), tolerance)


def perturb_ulp(x: torch.Tensor, seed: int = SEED) -> torch.Tensor:
    """``x`` with every element moved one float32 ulp up or down at random."""
    gen = torch.Generator().manual_seed(seed)
    sign = torch.randint(0, 2, x.shape, generator=gen).to(x) * 2 - 1
    return torch.nextafter(x, x + sign * x.abs().clamp_min(1.0))


def max_rel(got, want) -> float:
    """Worst ``max |got - want| / max |want|`` over the outputs (tensors or tuples of them)."""
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    worst = 0.0
    for a, e in zip(got, want, strict=True):
        a, e = a.detach().float().cpu(), e.detach().float().cpu()
        ref = e.abs().max().item()
        worst = max(worst, (a - e).abs().max().item() / (ref if ref > 0 else 1.0))
    return worst


def tolerance_for(dtype: str, floor: float) -> float:
    """``max(BASE_TOLERANCES[dtype], FLOOR_FACTORS[dtype] * floor)``."""
    return max(BASE_TOLERANCES[dtype], FLOOR_FACTORS[dtype] * floor)
