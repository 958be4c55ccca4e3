"""What the ``sapiens2 predict`` tests share: an in-process run of the command and readers of
what it wrote."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from sapiens2_cli.cli import main


def predict(*args, input=None, env=None):  # noqa: A002 - CliRunner's name
    """``sapiens2 predict ARGS`` in this process (arguments are str()-ed)."""
    return CliRunner().invoke(main, ["predict", *map(str, args)], input=input, env=env)


def files_under(root: Path) -> set[str]:
    """Every file below ``root``, as POSIX paths relative to it."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def read_json(path: Path) -> dict:
    return json.loads(path.read_text("utf-8"))
