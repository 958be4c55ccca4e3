"""Progress of a run: a rich bar on a terminal, plain periodic lines in a log, nothing with ``--quiet``.

Failures are always printed, one line each (``error: <file>: <reason>``), on stderr.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

LOG_INTERVAL_S = 30.0


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    """Counts shown as the run goes; use as a context manager."""

    def __init__(self, total: int, *, quiet: bool = False, stream: TextIO | None = None,
                 interval: float = LOG_INTERVAL_S) -> None:  # fmt: skip
        self.total = total
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.interval = interval
        self.ok = self.skipped = self.failed = 0
        self._start = self._last = time.monotonic()
        self._bar = None
        self._task_id = None

    @property
    def done(self) -> int:
        return self.ok + self.skipped + self.failed

    def __enter__(self) -> Progress:
        if not self.quiet and self.stream.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("predict"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"), TimeRemainingColumn(),
                console=Console(file=self.stream), transient=False,
            )  # fmt: skip
            self._bar.start()
            self._task_id = self._bar.add_task("predict", total=self.total, status="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._refresh()
            self._bar.stop()
        elif not self.quiet:
            self._log_line()

    def advance(self, *, ok: int = 0, skipped: int = 0, failed: int = 0) -> None:
        self.ok += ok
        self.skipped += skipped
        self.failed += failed
        if self._bar is not None:
            self._refresh()
        elif not self.quiet and time.monotonic() - self._last >= self.interval:
            self._log_line()

    def add_total(self, count: int) -> None:
        """The run turned out to have ``count`` more items (a video's frames; negative to correct)."""
        self.total += count
        if self._bar is not None:
            self._bar.update(self._task_id, total=self.total)

    def error(self, line: str) -> None:
        """One failure line, printed whatever the verbosity."""
        if self._bar is not None:
            self._bar.console.print(f"error: {line}", markup=False, highlight=False)
        else:
            print(f"error: {line}", file=self.stream, flush=True)

    def _rate(self) -> float:
        elapsed = time.monotonic() - self._start
        return self.ok / elapsed if elapsed > 0 else 0.0

    def _status(self) -> str:
        return f"ok {self.ok} skipped {self.skipped} failed {self.failed}  {self._rate():.2f} img/s"

    def _refresh(self) -> None:
        self._bar.update(self._task_id, completed=self.done, status=self._status())

    def _log_line(self) -> None:
        self._last = time.monotonic()
        rate = self._rate()
        left = self.total - self.done
        eta = f", eta {_duration(left / rate)}" if rate > 0 and left else ""
        pct = 100.0 * self.done / self.total if self.total else 100.0
        print(f"predict: {self.done}/{self.total} ({pct:.0f}%) {self._status()}{eta}", file=self.stream, flush=True)
