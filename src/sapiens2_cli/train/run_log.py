"""What a run reports while it trains: ``metrics.jsonl``, log lines and a progress bar.

``RUN/metrics.jsonl`` holds one JSON object per line, written by rank 0 and flushed at once:
training lines ``{"step", "split": "train", "loss", <loss terms>, "lr", "grad_norm",
"elapsed_s"}`` (values averaged over the steps since the previous line, over micro-batches and
over ranks; ``lr`` is the largest group LR used at that step) and validation lines
``{"step", "split": "val", <metrics>, "best"?}``. On resume the lines after the resumed step
are dropped first, so the file always tells one consistent history.

On a terminal rank 0 shows a rich progress bar with the step, loss and ETA; every training and
validation line also goes to the ``sapiens2`` logger as plain text (console and
``RUN/train.log``).
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from sapiens2_cli.distributed import DistEnv, console, is_terminal

__all__ = ["MetricsLog", "Progress", "format_line"]

log = logging.getLogger("sapiens2")


class MetricsLog:
    """Appends JSON lines to ``path`` on rank 0 (a no-op elsewhere)."""

    def __init__(self, path: str | Path, env: DistEnv, *, keep_until: int) -> None:
        self.path, self.enabled = Path(path), env.is_main
        if self.enabled:
            self._truncate(keep_until)

    def _truncate(self, keep_until: int) -> None:
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                step = json.loads(line).get("step", math.inf)
            except json.JSONDecodeError:
                break  # a line cut by a crash: it and anything after it go
            if step > keep_until:
                break
            kept.append(line)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(f"{line}\n" for line in kept))
        os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return (
            f"{value:.3e}"
            if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e4)
            else f"{value:.4f}"
        )
    return str(value)


def format_line(record: dict[str, Any], total: int) -> str:
    """``step 20/40 [val] key value ...`` (lists, ``split`` and ``elapsed_s`` left out)."""
    head = f"step {record['step']}/{total}"
    if record.get("split") == "val":
        head += " val"
    skip = {"step", "split", "elapsed_s"}
    parts = [
        f"{k} {_fmt(v)}" for k, v in record.items() if k not in skip and not isinstance(v, list)
    ]
    return "  ".join([head, *parts])


class Progress:
    """Step counter with an ETA: a live rich bar on a terminal (rank 0), log lines otherwise."""

    def __init__(self, *, total: int, start: int, env: DistEnv) -> None:
        self.total, self.start = total, start
        self.t0 = time.monotonic()
        self._bar = None
        if env.is_main and is_terminal():
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[loss]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=console(),
                transient=False,
            )
            self._task = self._bar.add_task("train", total=total, completed=start, loss="")
            self._bar.start()

    def eta(self, step: int) -> str:
        done = step - self.start
        if done <= 0:
            return "?"
        seconds = (time.monotonic() - self.t0) / done * (self.total - step)
        return str(datetime.timedelta(seconds=round(seconds)))

    def update(self, step: int, loss: float | None = None) -> None:
        if self._bar is not None:
            fields = {"loss": f"loss {loss:.4f}"} if loss is not None else {}
            self._bar.update(self._task, completed=step, **fields)

    def report(self, record: dict[str, Any]) -> None:
        """Log a metrics record as one plain line (with the ETA for training lines)."""
        line = format_line(record, self.total)
        if record.get("split") == "train":
            line += f"  eta {self.eta(record['step'])}"
            self.update(record["step"], record.get("loss"))
        log.info(line)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
