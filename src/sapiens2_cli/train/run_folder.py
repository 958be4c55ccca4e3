"""The run folder every training command writes, and the rank-0 helpers around it.

``RUN/config.yaml`` (the resolved configuration, written before anything else runs),
``RUN/metrics.jsonl`` and ``RUN/train.log`` (``run_log.py``), ``RUN/checkpoints/``
(``checkpoint.py``) and ``RUN/final.safetensors`` (the released-layout weights). A folder that
already holds a run is only continued with ``resume=True`` and only with the same
configuration, so a resumed run is the run that was started.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from sapiens2_cli.distributed import DistEnv, broadcast_object
from sapiens2_cli.train.checkpoint import list_checkpoints
from sapiens2_cli.train.config import Config, to_yaml, write_config

__all__ = ["RunError", "config_differences", "on_main", "prepare_run_dir"]

T = TypeVar("T")


class RunError(RuntimeError):
    """The run folder cannot be used as asked (the message says why and what to do)."""


def config_differences(old: str, new: str) -> list[str]:
    """Dotted keys whose values differ between two ``to_yaml`` texts (``output_dir`` ignored)."""

    def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(tree, dict):
            out: dict[str, Any] = {}
            for key, value in tree.items():
                out.update(flat(value, f"{prefix}{key}."))
            return out
        return {prefix[:-1]: tree}

    a, b = flat(yaml.safe_load(old) or {}), flat(yaml.safe_load(new) or {})
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k != "output_dir")
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys]


def prepare_run_dir(cfg: Config, run_dir: Path, *, resume: bool) -> bool:
    """Check ``run_dir`` against ``resume`` and write ``config.yaml``; returns True to resume.

    Raises:
        RunError: the folder holds a run and ``resume`` is off, or its configuration differs.
    """
    saved = run_dir / "config.yaml"
    has_run = bool(list_checkpoints(run_dir)) or (run_dir / "final.safetensors").exists()
    if has_run and not resume:
        raise RunError(
            f"{run_dir} already holds a run; pass --resume to continue it or choose another "
            "output folder"
        )
    if resume and has_run and saved.is_file():
        changed = config_differences(saved.read_text(), to_yaml(cfg))
        if changed:
            raise RunError(
                f"{saved}: the run was started with another configuration, so it cannot be "
                f"resumed exactly; differences: {'; '.join(changed)}"
            )
    write_config(cfg, saved)
    return resume and has_run


def on_main(env: DistEnv, fn: Callable[[], T]) -> T | None:
    """Run ``fn`` on rank 0; an exception there is raised on every rank (no rank hangs)."""
    result, error = None, None
    if env.is_main:
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - re-raised below on every rank
            error = err
    error = broadcast_object(error, env)
    if error is not None:
        raise error
    return result
