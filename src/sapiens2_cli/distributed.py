"""torchrun environment, process groups, collectives of small objects, rank-zero logging.

A job is one process (``python -m sapiens2_cli ...``) or ``N`` processes started by torchrun
(``torchrun --nproc-per-node N [--nnodes M --rdzv-endpoint HOST:PORT] -m sapiens2_cli ...``),
which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous variables.
:func:`init_distributed` reads them, picks the device (``cuda:LOCAL_RANK`` when CUDA is
available, else CPU) and creates the default process group with NCCL on CUDA and gloo on CPU.
Every helper below is a no-op in a single process, so the same code path runs both ways.

Logging: the ``sapiens2`` logger prints on rank 0 only (other ranks print warnings and errors,
prefixed with their rank) and, when given a run folder, also appends plain lines to
``RUN/train.log``. On a terminal the console lines go through rich so that they render above a
live progress bar (:func:`console`).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DistEnv",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "console",
    "gather_objects",
    "init_distributed",
    "scatter_objects",
    "setup_logging",
    "shutdown",
]

LOGGER = "sapiens2"


@dataclasses.dataclass(frozen=True)
class DistEnv:
    """Where this process stands in the job.

    ``owns_group``: this process created the default process group (and destroys it).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(
    *, device: str | torch.device | None = None, timeout_minutes: float = 30.0
) -> DistEnv:
    """Read the torchrun variables and join (or create) the default process group.

    Args:
        device: force a device (``"cpu"``, ``"cuda"``); None = ``cuda:LOCAL_RANK`` if CUDA is
            available, else CPU. With several processes on CUDA each takes its local rank's GPU.
        timeout_minutes: collective timeout (validation and checkpoint writing happen between
            collectives, so this bounds them too).
    """
    rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} outside [0, WORLD_SIZE={world})")
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(minutes=timeout_minutes),
            device_id=device if device.type == "cuda" else None,
        )
        owns = True
    if world > 1 and dist.get_world_size() != world:
        raise RuntimeError(
            f"the process group has {dist.get_world_size()} ranks but WORLD_SIZE={world}"
        )
    return DistEnv(
        rank=rank, world_size=world, local_rank=local_rank, device=device, owns_group=owns
    )


def shutdown(env: DistEnv) -> None:
    """Destroy the process group if :func:`init_distributed` created it."""
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (on the collective's device) and return it."""
    if not env.distributed:
        return tensor
    original = tensor.device
    work = tensor.to(env.device) if env.device.type == "cuda" else tensor
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    if work is not tensor:
        tensor.copy_(work.to(original))
    return tensor


def broadcast_object(obj: Any, env: DistEnv) -> Any:
    """Rank 0's ``obj`` on every rank (picklable objects)."""
    if not env.distributed:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_objects(obj: Any, env: DistEnv) -> list[Any] | None:
    """Every rank's ``obj`` in rank order on rank 0; None elsewhere."""
    if not env.distributed:
        return [obj]
    out: list[Any] | None = [None] * env.world_size if env.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def scatter_objects(objs: Sequence[Any] | None, env: DistEnv) -> Any:
    """Rank 0 holds one object per rank; each rank receives its own."""
    if not env.distributed:
        assert objs is not None
        return objs[0]
    out: list[Any] = [None]
    dist.scatter_object_list(out, list(objs) if env.is_main else None, src=0)
    return out[0]


# --------------------------------------------------------------------------- logging
_CONSOLE = None


def console() -> Any:
    """The shared rich console on stderr (progress bars and log lines use the same one)."""
    global _CONSOLE
    if _CONSOLE is None:
        from rich.console import Console

        _CONSOLE = Console(stderr=True)
    return _CONSOLE


def is_terminal() -> bool:
    return sys.stderr.isatty()


def setup_logging(env: DistEnv, log_file: str | Path | None = None) -> logging.Logger:
    """Configure the ``sapiens2`` logger for this rank (idempotent: old handlers are replaced).

    Rank 0: INFO to the console (rich on a terminal, plain lines otherwise) and, if
    ``log_file`` is given, plain timestamped lines appended to it. Other ranks: warnings only,
    prefixed ``[rank N]``.
    """
    logger = logging.getLogger(LOGGER)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.propagate = False
    logger.setLevel(logging.INFO if env.is_main else logging.WARNING)
    if env.is_main and is_terminal():
        from rich.logging import RichHandler

        stream: logging.Handler = RichHandler(
            console=console(), show_path=False, show_level=False, show_time=False, markup=False
        )
        stream.setFormatter(logging.Formatter("%(message)s"))
    else:
        stream = logging.StreamHandler(sys.stderr)
        prefix = "" if env.is_main else f"[rank {env.rank}] "
        stream.setFormatter(logging.Formatter(prefix + "%(message)s"))
    logger.addHandler(stream)
    if env.is_main and log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        logger.addHandler(file_handler)
    return logger
