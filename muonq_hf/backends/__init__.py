"""Backends: where each stage of a MuonQ step runs (docs/design.md, "Backends").

A backend is chosen once per set of parameters (``choose_backend``) and cached by the optimizer:

* ``OwnerBackend``: one process, replicated DDP (each rank is its own world of one), and DDP with
  ``ddp_shard_state`` (each Muon matrix stepped whole by one owner rank, AdamW tensors by rows).
* ``FSDP2Backend``: DTensor parameters (``fully_shard``): row-sharded state, Newton-Schulz on owner ranks.
* DeepSpeed ZeRO-1/2 runs through ``muonq_hf.deepspeed.DeepSpeedMuonQ``, a client-optimizer adapter over
  the same helpers (``backends.common``).

Every backend has the same four methods: ``all_finite(grads)`` (one decision, agreed by all ranks),
``step(tasks, states)``, ``full_state(tasks, states)`` (a context in which every rank holds the whole state,
for ``state_dict``) and ``keep_local(tasks, states)`` (after a full load, keep this rank's part), plus
``sharded`` (whether the state is split across ranks; converting such a state is refused). Backends import the
core (``state``, ``momentum``, ``adamw``); the core never imports a backend.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from contextlib import AbstractContextManager
from typing import Protocol

import torch
import torch.distributed as dist

from .common import MomentumStage, Task
from .fsdp2 import FSDP2Backend, check_fsdp_plugin, check_model, check_parameter, is_dtensor
from .owner import OwnerBackend


class Backend(Protocol):
    """Where the stages of a step run; see the module docstring."""

    sharded: bool
    capturable: bool  # a CUDA graph can record its step (muonq_hf.graphs)

    def all_finite(self, grads: list[torch.Tensor]) -> bool: ...

    def step(self, tasks: list[Task], states: MutableMapping[torch.Tensor, dict]) -> None: ...

    def full_state(
        self, tasks: list[Task], states: MutableMapping[torch.Tensor, dict]
    ) -> AbstractContextManager[None]: ...

    def keep_local(self, tasks: list[Task], states: MutableMapping[torch.Tensor, dict]) -> None: ...


def choose_backend(
    params: Iterator[torch.Tensor], ddp_shard_state: bool, momentum: MomentumStage, batch: int | None = None,
    grouped: bool = True,
) -> Backend:
    """The backend these parameters need: FSDP2 if any is a DTensor, DDP state sharding if requested in a
    multi-rank world, else one process (refusing FSDP1 flat parameters and tensor-parallel layouts).
    ``batch``: gradient elements of a shape group of same-plan matrices stepped together (None: the device's
    default, 0: one by one); ``grouped``: False where the momentum stage is not the package's own (it then runs
    parameter by parameter); the one-process / DDP backend uses both."""
    params = list(params)
    for p in params:
        check_parameter(p)
    if any(is_dtensor(p) for p in params):
        if ddp_shard_state:
            raise ValueError(
                "MuonQ: ddp_shard_state=True is for DDP (replicated parameters); under FSDP2 the state is already "
                "row-sharded with the parameters: drop ddp_shard_state"
            )
        return FSDP2Backend(momentum)
    if ddp_shard_state and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return OwnerBackend.ddp(momentum, batch=batch, grouped=grouped)
    return OwnerBackend(momentum, batch=batch, grouped=grouped)


__all__ = [
    "Backend",
    "FSDP2Backend",
    "OwnerBackend",
    "Task",
    "check_fsdp_plugin",
    "check_model",
    "check_parameter",
    "choose_backend",
    "is_dtensor",
]
