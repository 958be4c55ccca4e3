"""Keypoint sets: names, horizontal-flip partners, OKS sigmas, half-body ids, part groups.

The default is the 308-keypoint Sapiens2 set (``data/keypoints308.json``). A COCO keypoint
file with another set describes it in its person category: ``keypoints`` (names), optionally
``flip_pairs`` (index or name pairs; default: names that differ only by left <-> right),
``sigmas`` (default: the 308 table's sigma for matching names), ``upper_body_ids`` /
``lower_body_ids`` (default: matching names' half-body tags from the 308 table).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

import numpy as np

from sapiens2_cli.train.files import DataError

__all__ = ["KeypointSet"]


@lru_cache(maxsize=1)
def _table() -> dict[str, Any]:
    return json.loads(
        resources.files("sapiens2_cli.data").joinpath("keypoints308.json").read_text()
    )


@dataclass(frozen=True)
class KeypointSet:
    """Per-keypoint metadata; arrays are indexed by keypoint id.

    Attributes:
        names: ``K`` names.
        flip_index: ``[K]``: keypoint i becomes ``flip_index[i]`` after a horizontal flip.
        sigmas: ``[K]`` OKS constants, or None when unknown (evaluation then fails).
        upper, lower: keypoint ids used by the half-body crop.
        groups: part name -> ids (evaluated separately, e.g. ``face``).
        is_308: the Sapiens2 set (enables its body-keypoint load filter).
    """

    names: tuple[str, ...]
    flip_index: np.ndarray
    sigmas: np.ndarray | None
    upper: np.ndarray
    lower: np.ndarray
    groups: dict[str, np.ndarray] = field(default_factory=dict)
    is_308: bool = False

    def __len__(self) -> int:
        return len(self.names)

    @classmethod
    def keypoints308(cls) -> KeypointSet:
        rows = _table()["keypoints"]
        groups: dict[str, list[int]] = {}
        for r in rows:
            groups.setdefault(r["group"], []).append(r["index"])
        return cls(
            names=tuple(r["name"] for r in rows),
            flip_index=np.array([r["flip_index"] for r in rows], dtype=np.int64),
            sigmas=np.array([r["sigma"] for r in rows], dtype=np.float64),
            upper=np.array(
                [r["index"] for r in rows if r["half_body_type"] == "upper"], dtype=np.int64
            ),
            lower=np.array(
                [r["index"] for r in rows if r["half_body_type"] == "lower"], dtype=np.int64
            ),
            groups={k: np.array(v, dtype=np.int64) for k, v in groups.items() if k != "extra"},
            is_308=True,
        )

    @classmethod
    def from_category(cls, category: dict[str, Any], where: str) -> KeypointSet:
        """Build from a COCO category (``where`` names the file for errors)."""
        names = tuple(str(n) for n in category.get("keypoints") or ())
        base = cls.keypoints308()
        if not names or names == base.names or len(names) == 344:
            return base
        if len(set(names)) != len(names):
            raise DataError(f"{where}: keypoint names in the category are not unique")
        index = {n: i for i, n in enumerate(names)}
        flip = np.arange(len(names), dtype=np.int64)
        pairs = category.get("flip_pairs")
        if pairs is None:
            pairs = [
                (i, index[_swap_side(n)]) for i, n in enumerate(names) if _swap_side(n) in index
            ]
        for pair in pairs:
            a, b = (index[p] if isinstance(p, str) and p in index else p for p in pair)
            if not (
                isinstance(a, int)
                and isinstance(b, int)
                and 0 <= a < len(names)
                and 0 <= b < len(names)
            ):
                raise DataError(f"{where}: flip pair {pair} does not name two keypoints")
            flip[a], flip[b] = b, a
        known = {n: i for i, n in enumerate(base.names)}
        if "sigmas" in category:
            sigmas = np.asarray(category["sigmas"], dtype=np.float64)
            if sigmas.shape != (len(names),):
                raise DataError(f"{where}: {sigmas.size} sigmas for {len(names)} keypoints")
        elif all(n in known for n in names):
            sigmas = base.sigmas[[known[n] for n in names]]
        else:
            sigmas = None

        def ids(key: str, tag: np.ndarray) -> np.ndarray:
            if key in category:
                return np.asarray(category[key], dtype=np.int64)
            tagged = {base.names[i] for i in tag}
            return np.array([i for i, n in enumerate(names) if n in tagged], dtype=np.int64)

        return cls(
            names=names,
            flip_index=flip,
            sigmas=sigmas,
            upper=ids("upper_body_ids", base.upper),
            lower=ids("lower_body_ids", base.lower),
        )


def _swap_side(name: str) -> str:
    def swap(match: re.Match) -> str:
        word = match.group(0)
        new = {"left": "right", "right": "left"}[word.lower()]
        return new.capitalize() if word[0].isupper() else new

    return re.sub(r"left|right", swap, name, flags=re.IGNORECASE)
