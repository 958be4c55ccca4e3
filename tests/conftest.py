"""Shared test helpers: where the fixtures live, tiny models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("SAPIENS2_FIXTURES", REPO.parent / "shared" / "fixtures"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def fixture_cases(kind: str) -> list[Path]:
    """Every case folder under ``$SAPIENS2_FIXTURES/<kind>`` (sorted); none found is an error."""
    root = FIXTURES / kind
    cases = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not cases:
        raise RuntimeError(f"no fixture case found under {root} (set SAPIENS2_FIXTURES)")
    return cases


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES
