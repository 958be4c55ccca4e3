"""What ``sapiens2 models`` and ``sapiens2 inspect`` report."""

from __future__ import annotations

import collections
import os

import torch

from sapiens2_cli.hub import is_cached
from sapiens2_cli.models.heads import official_head
from sapiens2_cli.models.sapiens2 import Sapiens2Model
from sapiens2_cli.models.zoo import ZOO, ZooRecord
from sapiens2_cli.weights import (
    PERIODS_KEY,
    CheckpointError,
    build_meta,
    describe,
    file_key,
    read_header,
    resolve,
)


def _parameters(record: ZooRecord) -> int:
    head = None if record.task == "pretrain" else official_head(record.task, record.size, record.arch.embed_dims)
    with torch.device("meta"):
        model = Sapiens2Model(record.task, record.arch, head)
    return sum(t.numel() for t in model.state_dict().values())  # as the release counts: buffers too


def zoo_table(tasks: set[str] | None = None) -> list[dict]:
    """One row per released weight set (no network: ``cached`` reads the local HF cache only)."""
    rows = []
    for record in ZOO.values():
        if tasks and record.task not in tasks:
            continue
        rows.append(
            {
                "name": record.name,
                "task": record.task,
                "size": record.size,
                "repo_id": record.repo_id,
                "filename": record.filename,
                "parameters": _parameters(record),
                "input_size": list(record.input_size),
                "cached": is_cached(record.repo_id, record.filename),
                "note": "" if record.listed else "not listed in the official model zoo",
            }
        )
    return rows


def inspect_checkpoint(ref: str | os.PathLike) -> dict:
    """Inferred task / architecture / head, dtypes, key count and every problem found."""
    resolved = resolve(ref)
    header = read_header(resolved.path)
    info = describe(header, resolved.record)
    problems: list[str] = []
    model = build_meta(info)
    bare = "cls_token" in header.shapes
    expected = {file_key(k, bare=bare): tuple(v.shape) for k, v in model.state_dict().items()}
    if PERIODS_KEY not in {k.removeprefix("backbone.") for k in header.shapes}:
        problems.append("no rope_embed.periods tensor (re-derived on load)")
    if resolved.record is not None and info.size != resolved.record.size:
        problems.append(f"architecture is not the released {resolved.record.size} one")
    try:
        from sapiens2_cli.weights import check_keys

        check_keys(expected, header.shapes, resolved.path)
    except CheckpointError as err:
        problems.append(str(err))
    dtypes = collections.Counter(header.dtypes.values())
    return {
        "file": str(resolved.path),
        "task": info.task,
        "size": info.size or "custom",
        "arch": info.arch.to_dict() | {"kv_heads": sorted(set(info.arch.kv_heads))},
        "head": info.head.to_dict() if info.head else None,
        "input_size": f"{info.input_size[0]}x{info.input_size[1]}",
        "keys": len(header.shapes),
        "parameters": sum(int(torch.Size(s).numel()) for s in header.shapes.values()),
        "dtypes": dict(dtypes),
        "metadata": info.metadata,
        "problems": problems,
    }
