"""Data parallelism (DDP or FSDP2), activation checkpointing, torch.compile, and full state dicts.

``parallelize`` takes the model as built on rank 0 (real weights) and on the other ranks (on the
meta device, no memory) and returns the module to train, every rank holding rank 0's weights:

* one process: the model moved to the device, unwrapped;
* ``ddp``: ``DistributedDataParallel``; its constructor broadcasts rank 0's parameters and
  buffers (the other ranks' tensors are allocated uninitialised first);
* ``fsdp``: FSDP2 — ``fully_shard`` on every unit (by default each transformer block and the
  decode head; a model with other parts passes its own ``units``) and on the root, which
  holds the parameters of no unit (so parameters are all-gathered unit by unit); with
  ``precision: bf16`` the parameters are cast to bf16 for compute and gradients reduced in
  fp32. Rank 0's full state dict (taken before sharding) is then broadcast shard by shard.
  Parameters that do not require gradients (a frozen or EMA-updated copy) are sharded the
  same way and simply receive no gradient.

Activation checkpointing re-runs each backbone block in the backward pass
(``backbone.grad_checkpointing``); ``compile`` compiles each unit separately (before
sharding, so FSDP's hooks stay outside the graphs). Units are entered through ``__call__``
(FSDP2's hooks are forward hooks).

State dicts go through ``torch.distributed.checkpoint.state_dict`` with full (unsharded)
tensors gathered to rank 0's CPU, so a checkpoint has the same layout whatever the parallelism
and world size: parameter names without wrapper prefixes, optimizer state keyed by name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from torch import nn

from sapiens2_cli.distributed import DistEnv

__all__ = [
    "full_state",
    "grad_sync",
    "load_full_state",
    "parallelize",
    "unwrap",
]


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (FSDP2 shards in place, so it is the module itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def parallelize(
    model: nn.Module,
    env: DistEnv,
    *,
    mode: Literal["ddp", "fsdp"],
    precision: Literal["fp32", "bf16"] = "fp32",
    activation_checkpointing: bool = False,
    compile: bool = False,
    units: Sequence[nn.Module] | None = None,
) -> nn.Module:
    """Place, wrap and synchronise ``model`` (module docstring). Rank 0's weights win.

    ``units``: the sub-modules compiled one by one and made FSDP2 units, inner ones before the
    modules that contain them; None = ``model.backbone.blocks`` and ``model.decode_head``.
    ``activation_checkpointing`` sets ``model.backbone.grad_checkpointing`` when there is one.
    """
    backbone = getattr(model, "backbone", None)
    if backbone is not None:
        backbone.grad_checkpointing = activation_checkpointing
    if units is None:
        units = list(backbone.blocks) if backbone is not None else []
        if getattr(model, "decode_head", None) is not None:
            units.append(model.decode_head)
    units = list(units)
    if compile:
        from sapiens2_cli.models.compiled import KEEP_ROUNDING

        for unit in units:
            unit.compile(options=KEEP_ROUNDING)  # the forward rounds RoPE as the released model does
    if not env.distributed:
        return model.to(env.device)
    if mode == "ddp":
        if not env.is_main:
            model = model.to_empty(device=env.device)
        model = model.to(env.device)
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == "cuda" else None
        )
    return _fsdp(model, env, precision, units)


def _fsdp(model: nn.Module, env: DistEnv, precision: str, units: list[nn.Module]) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    full = model.state_dict() if env.is_main else {}
    mesh = init_device_mesh(env.device.type, (env.world_size,))
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if precision == "bf16" else None,
        reduce_dtype=torch.float32,
    )
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    if not env.is_main:
        model.to_empty(device=env.device)
    load_full_state(model, full, env)
    return model


@contextlib.contextmanager
def grad_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Turn off gradient all-reduce for the micro-batches before the last of an accumulation."""
    if enabled:
        yield
        return
    if isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
        return
    setter = getattr(model, "set_requires_gradient_sync", None)  # FSDP2 modules
    if setter is None:
        yield
        return
    setter(False)
    try:
        yield
    finally:
        setter(True)


def _options(**kwargs: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Full model (and optimizer) state on rank 0's CPU; empty dicts on the other ranks.

    Collective under FSDP: every rank must call it.
    """
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
    )

    if optimizer is None:
        return get_model_state_dict(unwrap(model), options=_options(cpu_offload=True)), None
    return get_state_dict(unwrap(model), optimizer, options=_options(cpu_offload=True))


def load_full_state(
    model: nn.Module,
    model_state: dict[str, torch.Tensor],
    env: DistEnv,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> None:
    """Load full state dicts held by rank 0 (other ranks pass empty dicts) into every rank."""
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = _options(broadcast_from_rank0=env.distributed)
    inner = unwrap(model)
    set_model_state_dict(inner, model_state, options=options)
    if optimizer is not None:
        set_optimizer_state_dict(inner, optimizer, optimizer_state or {}, options=options)
