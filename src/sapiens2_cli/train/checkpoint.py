"""Training checkpoints: everything needed to continue a run exactly where it stopped.

One file per checkpoint, ``RUN/checkpoints/step_<step, 8 digits>.pt`` (``torch.save``, loadable
with ``weights_only=True``), holding

* ``model`` / ``optimizer``: full (unsharded) state dicts keyed by parameter name, gathered to
  rank 0's CPU (``parallel.full_state``), so a checkpoint written by DDP, FSDP2 or one process
  resumes under any of them and on any number of ranks;
* ``scheduler``: the LR scheduler's state;
* ``trainer``: step, micro-batches consumed per rank, world size, best validation value;
* ``local``: one entry per rank — its RNG states (torch CPU and CUDA, NumPy, Python) and its
  running loss sums since the last log line;
* ``extra``: ``state_dict()`` of any extra stateful object of the loop (e.g. an EMA teacher).

Only rank 0 touches the file system: it writes a temporary file next to the target, fsyncs it
and renames it into place, so a crash never leaves a truncated checkpoint under a final name;
then it deletes all but the newest ``keep`` checkpoints. On load, rank 0 reads the file and
broadcasts: nodes need no shared file system. Memory: rank 0 holds the full fp32 weights and
both AdamW moments on the host while saving or loading (about 12 bytes per parameter: ~60 GB
for 5B), the price of a layout independent of the parallelism.

Sharded (``checkpoint.sharded``, for FSDP2 runs too large for that): a folder
``RUN/checkpoints/step_<step>/`` in which every rank writes its own shards of ``model`` and
``optimizer`` with ``torch.distributed.checkpoint`` (no gathering; each rank holds only its
shards), beside ``meta.pt`` with everything else (rank 0). The folder is built as
``.step_<step>.tmp`` and renamed once every rank has written, so the same crash guarantee
holds. Every rank must see the same file system. ``torch.distributed.checkpoint`` reshards on
load, so a sharded checkpoint resumes on another number of ranks, or in one process.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from sapiens2_cli.distributed import (
    DistEnv,
    barrier,
    broadcast_object,
    gather_objects,
    scatter_objects,
)
from sapiens2_cli.train.parallel import full_state, load_full_state, unwrap

__all__ = [
    "CHECKPOINT_DIR",
    "Stateful",
    "capture_rng",
    "checkpoint_path",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "restore_rng",
    "save_checkpoint",
]

CHECKPOINT_DIR = "checkpoints"
FORMAT_VERSION = 1
_NAME = re.compile(r"^step_(\d{8})(\.pt)?$")  # a file, or a folder of shards
META = "meta.pt"  # a sharded checkpoint's non-tensor state


class Stateful(Protocol):
    """An object saved with the checkpoint. ``state_dict()`` is called on every rank (it may be
    collective) and must return the full state on rank 0; ``load_state_dict`` receives rank 0's
    saved state on every rank."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step_{step:08d}.pt"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every complete checkpoint of a run, oldest first."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


# --------------------------------------------------------------------------- RNG
def capture_rng(device: torch.device) -> dict[str, Any]:
    """This process's RNG states as tensors and plain values (``weights_only``-loadable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: Mapping[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (
            n["kind"],
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# --------------------------------------------------------------------------- save / load
def _atomic_save(payload: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer: dict[str, Any],
    local: dict[str, Any],
    env: DistEnv,
    extra: Mapping[str, Stateful] | None = None,
    keep: int | None = None,
    sharded: bool = False,
) -> Path:
    """Write the checkpoint of ``step`` (collective: every rank calls it; module docstring)."""
    path = checkpoint_path(run_dir, step)
    if sharded:
        path = path.with_suffix("")  # a folder
        _save_shards(Path(run_dir), step, model, optimizer, env)
        tensors = {}  # in the shards
    else:
        tensors = dict(zip(("model", "optimizer"), full_state(model, optimizer), strict=True))
    locals_ = gather_objects(local, env)
    extra_state = {name: obj.state_dict() for name, obj in (extra or {}).items()}
    if env.is_main:
        payload = {
            "format_version": FORMAT_VERSION,
            **tensors,
            "scheduler": scheduler.state_dict(),
            "trainer": dict(trainer, step=step),
            "local": locals_,
            "extra": extra_state,
        }
        if sharded:
            folder = _shard_folder(Path(run_dir), step)
            _atomic_save(payload, folder / META)
            _remove(path)
            os.replace(folder, path)
        else:
            _atomic_save(payload, path)
        if keep is not None:
            for _, old in list_checkpoints(run_dir)[: -max(keep, 1)]:
                _remove(old)
    barrier(env)
    return path


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """Without a process group, torch.distributed.checkpoint warns on every call that it
    assumes one process: it is right, and the warning would repeat at every checkpoint."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _shard_folder(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINT_DIR / f".step_{step:08d}.tmp"


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _save_shards(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 env: DistEnv) -> None:  # fmt: skip
    """Every rank writes its shards of model and optimizer into the step's temporary folder."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    folder = _shard_folder(run_dir, step)
    if env.is_main:
        _remove(folder)  # left by a run killed while writing it
        folder.mkdir(parents=True)
    barrier(env)
    model_state, optim_state = get_state_dict(unwrap(model), optimizer)
    with _single_process_quiet():
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=folder, no_dist=not env.distributed)


def load_checkpoint(
    path: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    env: DistEnv,
    extra: Mapping[str, Stateful] | None = None,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Restore model, optimizer, scheduler and extra state from a checkpoint.

    Returns:
        ``(trainer state, this rank's local state)``; the local state is None when the
        checkpoint was written by a different number of ranks.

    Raises:
        ValueError: the file is not a checkpoint of this format (the message names it).
    """
    path = Path(path)
    sharded = path.is_dir()
    payload: dict[str, Any] = {}
    if env.is_main:
        source = path / META if sharded else path
        try:
            payload = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - re-raised with the file named
            raise ValueError(f"{source}: cannot read the checkpoint ({err})") from err
        if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{source}: not a sapiens2 training checkpoint (format {FORMAT_VERSION})"
            )
    if sharded:
        _load_shards(path, model, optimizer, env)
    else:
        load_full_state(
            model,
            payload.get("model", {}),
            env,
            optimizer=optimizer,
            optimizer_state=payload.get("optimizer", {}),
        )
    small = broadcast_object(
        {k: payload[k] for k in ("scheduler", "trainer", "extra")} if env.is_main else None, env
    )
    scheduler.load_state_dict(small["scheduler"])
    for name, obj in (extra or {}).items():
        if name not in small["extra"]:
            raise ValueError(f"{path}: holds no state for {name!r}")
        obj.load_state_dict(small["extra"][name])
    trainer = small["trainer"]
    local = None
    if trainer.get("world_size") == env.world_size:
        local = scatter_objects(payload.get("local") if env.is_main else None, env)
    return trainer, local


def _load_shards(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv) -> None:
    """Model and optimizer state from a folder of shards, resharded to this run's layout."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    inner = unwrap(model)
    model_state, optim_state = get_state_dict(inner, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    try:
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=folder, no_dist=not env.distributed)
    except Exception as err:  # noqa: BLE001 - re-raised with the folder named
        raise ValueError(f"{folder}: cannot read the checkpoint's shards ({err})") from err
    set_state_dict(inner, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
