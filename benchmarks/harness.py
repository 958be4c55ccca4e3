"""Shared benchmark plumbing: random checkpoints, timing, peak memory, FLOPs, matmul peak.

Device-agnostic: the same code times a CPU or a CUDA run (``sync`` is a no-op on CPU, peak
memory is the resident-set high-water mark on CPU and the allocator's peak on CUDA).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

from sapiens2_cli.models.arch import ARCHS, BackboneArch, make_arch
from sapiens2_cli.models.heads import official_head
from sapiens2_cli.models.sapiens2 import ModelInfo, Sapiens2Model

# "tiny": 18 layers so that layers 8 and 9 use grouped-query attention, as in the fixtures
SIZES: dict[str, BackboneArch] = {**ARCHS, "tiny": make_arch(64, 18, 4)}
REPO = Path(__file__).resolve().parent.parent


def random_model(task: str, size: str, *, seed: int = 0) -> Sapiens2Model:
    """A float32 model of a released shape with random weights that exercise every branch.

    Norm weights and LayerScale ~ 1 +- 0.1 (so attention matters: the release's 1e-4 LayerScale
    init would hide it), matrices ~ N(0, 1/fan_in), everything else ~ N(0, 0.02).
    """
    arch = SIZES[size]
    head = None if task == "pretrain" else official_head(task, size, arch.embed_dims)
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = Sapiens2Model(task, arch, head)
    state = {}
    for name, t in model.state_dict().items():
        if name.endswith("periods"):
            continue  # the bf16 buffer, set below
        if name.endswith(("norm.weight", "ln1.weight", "ln2.weight", "gamma.weight")):
            value = 1 + 0.1 * torch.randn(t.shape, generator=gen)
        elif t.ndim >= 2 and "token" not in name and "pos_embed" not in name:
            value = torch.randn(t.shape, generator=gen) * t[0].numel() ** -0.5
        else:
            value = 0.02 * torch.randn(t.shape, generator=gen)
        state[name] = value
    from sapiens2_cli.models.rope import rope_periods

    state["backbone.rope_embed.periods"] = rope_periods(arch.head_dim, arch.rope_base)
    model.load_state_dict(state, assign=True)
    model.info = ModelInfo(task=task, arch=arch, head=head, size=size, source=f"random-{size}")
    return model.eval()


def random_checkpoint(task: str, size: str, cache: Path) -> Path:
    """``random_model`` written once in the released layout (``save_model``), then reused."""
    from sapiens2_cli.weights import save_model

    path = Path(cache) / f"random-{task}-{size}.safetensors"
    if not path.is_file():
        save_model(random_model(task, size), path)
    return path


# --------------------------------------------------------------------------- measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    m = re.search(rf"{field}:\s+(\d+) kB", text)
    if m is None:
        raise RuntimeError(f"/proc/self/status has no {field}")
    return int(m.group(1))


class PeakMemory:
    """Peak memory of one call above what was resident before it, in MiB.

    CPU: the process's resident high-water mark (``VmHWM``, reset through
    ``/proc/self/clear_refs``) minus ``VmRSS`` before the call. CUDA: the allocator's peak.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mib = float("nan")

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")
            self.base = _proc_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _proc_kib("VmHWM") * 1024
        self.peak_mib = (peak - self.base) / 2**20


@dataclasses.dataclass
class Timing:
    """Wall seconds, process CPU seconds and peak memory of each timed call."""

    wall: list[float] = dataclasses.field(default_factory=list)
    cpu: list[float] = dataclasses.field(default_factory=list)
    peak_mib: list[float] = dataclasses.field(default_factory=list)

    def add(self, fn: Callable[[], object], device: torch.device) -> object:
        sync(device)
        with PeakMemory(device) as mem:
            c0, t0 = time.process_time(), time.perf_counter()
            out = fn()
            sync(device)
            t1, c1 = time.perf_counter(), time.process_time()
        self.wall.append(t1 - t0)
        self.cpu.append(c1 - c0)
        self.peak_mib.append(mem.peak_mib)
        return out

    @property
    def median(self) -> float:
        return statistics.median(self.wall)


def model_flops(model_factory: Callable[[], torch.nn.Module], shape: tuple[int, ...]) -> int:
    """FLOPs of one forward at input ``shape`` (counted on the meta device: no compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = model_factory()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(shape, device="meta"))
    return counter.get_total_flops()


def matmul_peak(device: torch.device, dtype: torch.dtype, *, n: int | None = None, repeats: int = 5) -> float:
    """Best measured FLOP/s of a square ``n x n`` matmul (8192 on GPU, 4096 on CPU)."""
    n = n or (8192 if device.type == "cuda" else 4096)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b  # warm-up: library init, kernel selection
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def environment(device: torch.device) -> dict[str, object]:
    """What a result was measured on: versions, threads, CPU/GPU name, load, commit."""
    env: dict[str, object] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "loadavg_1m": os.getloadavg()[0],
        "commit": _commit(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def append_jsonl(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
