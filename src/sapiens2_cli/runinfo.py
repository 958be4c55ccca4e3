"""``OUT/run.json``: what a predict run did, for pipelines and for people.

It records the command, the versions of everything that shapes the numbers, each model's
reference, file and sha256 digest, the counts of images ok / skipped / failed (per run and
per task), every failure with its reason, per-stage timings and the throughput. A sharded run
writes ``OUT/run.shard-<i>-of-<N>.json`` instead, so that concurrent shards never share a file.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import os
import platform
import threading
from pathlib import Path
from typing import Any

from sapiens2_cli import __version__
from sapiens2_cli.writers import FileData, write_file

FORMAT_VERSION = 1
STAGES = (
    "load_models", "decode", "preprocess", "wait_for_input", "detect", "forward", "tile_blend", "postprocess",
    "write",
)  # fmt: skip


def run_file_name(shard: tuple[int, int]) -> str:
    index, count = shard
    return "run.json" if count == 1 else f"run.shard-{index:04d}-of-{count:04d}.json"


def versions() -> dict[str, str | None]:
    """Versions of Python and of every library that shapes the outputs."""
    import cv2
    import numpy
    import torch

    try:
        from importlib.metadata import version

        openexr = version("OpenEXR")
    except Exception:  # noqa: BLE001 - metadata lookups fail in odd installs; the field is informative
        openexr = None
    return {
        "sapiens2": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "numpy": numpy.__version__,
        "opencv": cv2.__version__,
        "openexr": openexr,
        "platform": platform.platform(),
    }


@dataclasses.dataclass
class Failure:
    """One failed input, video frame or video output (``frame`` / ``time`` set for frames)."""

    input: str
    reason: str
    task: str | None = None
    frame: int | None = None
    time: float | None = None

    @classmethod
    def of(cls, item: Any, reason: str, task: str | None = None) -> Failure:
        """The failure of a :class:`~sapiens2_cli.sources.Item` (a video frame keeps its index and time)."""
        return cls(str(item.path), reason, task, item.frame, item.time)

    def line(self) -> str:
        where = self.input if self.frame is None else f"{self.input} frame {self.frame}"
        where = f"{where}: {self.task}" if self.task else where
        return f"{where}: {self.reason}"

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key in ("frame", "time"):  # image failures keep the keys they always had
            if out[key] is None:
                del out[key]
        return out


class Digests:
    """sha256 digests of model files, computed on a background thread while the run goes on."""

    def __init__(self, paths: dict[str, str]) -> None:
        self._paths = paths
        self._result: dict[str, str] = {}
        self._thread = threading.Thread(target=self._compute, name="sapiens2-digest", daemon=True)
        self._thread.start()

    def _compute(self) -> None:
        from sapiens2_cli.weights import file_digest

        for task, path in self._paths.items():
            self._result[task] = file_digest(path)

    def get(self) -> dict[str, str]:
        self._thread.join()
        return dict(self._result)


@dataclasses.dataclass
class RunRecord:
    """Counts, failures and timings, filled in by the run loop (main thread only)."""

    tasks: tuple[str, ...]
    total: int = 0  # items of this shard
    ok: int = 0
    skipped: int = 0
    failed: int = 0
    per_task: dict[str, collections.Counter] = dataclasses.field(default_factory=dict)
    failures: list[Failure] = dataclasses.field(default_factory=list)
    timings: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    started: float = 0.0
    processing_s: float = 0.0  # wall time from the first item to the last write
    status: str = "completed"

    def __post_init__(self) -> None:
        self.per_task = {t: collections.Counter() for t in self.tasks}

    @property
    def done(self) -> int:
        return self.ok + self.skipped + self.failed

    def images_per_second(self) -> float | None:
        return self.ok / self.processing_s if self.processing_s > 0 and self.ok else None

    def to_json(self, *, options: dict[str, Any], models: dict[str, dict[str, Any]], extra: dict[str, Any]) -> dict:
        ips = self.images_per_second()
        return {
            "format_version": FORMAT_VERSION,
            "status": self.status,
            "command": list(options.pop("command")),
            "cwd": os.getcwd(),
            "started": datetime.datetime.fromtimestamp(self.started, datetime.timezone.utc).isoformat(),
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "options": options,
            "versions": versions(),
            "models": models,
            "counts": {"total": self.total, "ok": self.ok, "skipped": self.skipped, "failed": self.failed},
            "per_task": {t: {k: c[k] for k in ("ok", "skipped", "failed")} for t, c in self.per_task.items()},
            "failures": [f.to_json() for f in self.failures],
            "timings_s": {k: round(self.timings[k], 6) for k in STAGES} | {"processing": round(self.processing_s, 6)},
            "images_per_second": round(ips, 4) if ips else None,
            **extra,
        }


def write_run_json(path: Path, content: dict) -> None:
    write_file(path, FileData("json", content))  # one writer per name: each shard has its own

