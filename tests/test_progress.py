"""Progress: plain lines in a log, nothing but errors when quiet."""

from __future__ import annotations

import io

from sapiens2_cli.progress import Progress


def test_plain_lines_in_a_log():
    stream = io.StringIO()
    with Progress(4, stream=stream, interval=0.0) as progress:
        progress.advance(ok=1)
        progress.error("a.jpg: empty file (0 bytes)")
        progress.advance(failed=1)
        progress.advance(skipped=2)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("predict: 1/4 (25%) ok 1 skipped 0 failed 0")
    assert lines[1] == "error: a.jpg: empty file (0 bytes)"
    assert lines[-1].startswith("predict: 4/4 (100%) ok 1 skipped 2 failed 1")


def test_quiet_prints_only_errors():
    stream = io.StringIO()
    with Progress(2, stream=stream, quiet=True, interval=0.0) as progress:
        progress.advance(ok=1)
        progress.error("b.png: image too small (8x8 pixels; at least 16 on each side)")
        progress.advance(failed=1)
    assert stream.getvalue() == "error: b.png: image too small (8x8 pixels; at least 16 on each side)\n"


def test_interval_limits_the_lines():
    stream = io.StringIO()
    with Progress(100, stream=stream, interval=3600.0) as progress:
        for _ in range(100):
            progress.advance(ok=1)
    assert len(stream.getvalue().splitlines()) == 1  # only the final line
