"""FSDP2 (``fully_shard``: parameters are DTensors ``Shard(0)`` on a 1-D mesh): row-sharded state, one
Newton-Schulz per matrix in the world.

Each rank keeps the state of its own rows only (docs/design.md, "State layout"): row entries of the
``QuantizedMomentum`` are DTensors with the parameter's mesh and placements (built with the global shape, so
uneven and empty shards work), batch entries (per-matrix scales, R) are plain tensors, identical on every rank.
The momentum stage runs on the local rows with all-reduced norms, Gram matrices, R and absmax (``row_sum`` /
``row_max``). Newton-Schulz needs the whole matrix: every matrix has an owner rank (``assign_owners`` by NS
cost); in rounds of matrices with distinct owners, each is gathered on its owner (in the NS dtype,
``ns_dtype``), orthogonalized there and its rows scattered back (``orthogonalize_on_owners``).

Fused pieces (``qkv_split``) of any ``split_dim`` are handled by padding: the local rows of each piece are laid
out as (k, L, w) with zero rows (zero codes) where a rank holds fewer rows of a piece; zero rows add nothing to
any norm, Gram matrix, R or absmax, and are dropped again before the state is stored. With round-to-nearest
(the default) the codes equal the single-process ones up to fp32 reduction-order noise. With
``stochastic_rounding`` each rank draws the noise for its padded local block from the same keyed generator, so
the codes are unbiased but not the single-process bits.

Stacked experts (E, m, n) under Shard(0): each rank holds whole experts, so their whole step is local (no
reduction, no gather); every state entry is sharded on the expert dim like the weight. Plain (non-DTensor)
parameters in the same optimizer take the one-process path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..adamw import adamw_step
from ..matrices import MatrixPlan, plan_of
from ..momentum import apply_update, ns_dtype, orthogonalized_update
from ..state import QuantizedMomentum, adamw_quantized
from .common import (
    MomentumStage,
    RowShard,
    Task,
    all_finite,
    all_reduce,
    assign_owners,
    orthogonalize_on_owners,
    rounds,
    row_ranges,
    whole_step,
)

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # torch built without distributed support
    DTensor = Replicate = Shard = None  # type: ignore[assignment,misc]

States = MutableMapping[torch.Tensor, dict]


def is_dtensor(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


# ------------------------------------------------------------------------------------------- refusals
def check_parameter(p: torch.Tensor) -> None:
    """Refuse layouts the row-sharded state cannot follow: FSDP1 flat parameters, TP and multi-dim meshes."""
    if getattr(p, "_is_flat_param", False) or type(p).__name__ == "FlatParameter":
        raise ValueError(
            "MuonQ does not support FSDP1 (FullyShardedDataParallel flat parameters): Newton-Schulz needs each "
            "weight matrix, which a flat parameter hides. Use FSDP2 (torch.distributed.fsdp.fully_shard; in "
            "Accelerate fsdp_version: 2, see examples/accelerate/fsdp2.yaml)"
        )
    if not is_dtensor(p):
        return
    placements = tuple(p.placements)
    if placements not in ((Shard(0),), (Replicate(), Shard(0))):
        raise ValueError(
            f"MuonQ supports DTensor parameters sharded on dim 0 (FSDP2 fully_shard on a 1-D mesh, or HSDP: "
            f"(Replicate(), Shard(0)) on a 2-D mesh), got placements {placements} on a {p.device_mesh.ndim}-D mesh "
            f"for a parameter of shape {tuple(p.shape)}: tensor-parallel layouts (Shard(d>0), _StridedShard, "
            "Replicate alone) are not supported. Use FSDP2 or HSDP, or plain DDP (optionally "
            "MuonQ(ddp_shard_state=True))"
        )


@dataclass(frozen=True)
class RowGroup:
    """The ranks that share a parameter's rows (its mesh's Shard(0) dim): their process group, how many they are
    and this rank's place among them. Under HSDP each replica group is one such group: the rows, the state and
    every Newton-Schulz stay inside it (docs/design.md, "HSDP")."""

    group: Any
    size: int
    rank: int


def row_group(p: torch.Tensor) -> RowGroup:
    """The row group of DTensor ``p`` (placements (Shard(0),) or (Replicate(), Shard(0)))."""
    mesh, dim = p.device_mesh, len(p.placements) - 1  # Shard(0) is the last placement
    return RowGroup(mesh.get_group(dim), mesh.size(dim), mesh.get_local_rank(dim))


def check_fsdp_plugin(fsdp_plugin: Any) -> None:
    """Refuse an Accelerate FSDP plugin that is not FSDP2 (MuonQ needs FSDP2's per-parameter DTensors)."""
    version = getattr(fsdp_plugin, "fsdp_version", 1)
    if fsdp_plugin is not None and version != 2:
        raise _fsdp1_error(version)


def _fsdp1_error(version: Any) -> ValueError:
    return ValueError(
        f"MuonQ needs FSDP2, got fsdp_version={version!r}: FSDP1 flattens parameters, which hides the weight "
        "matrices that Newton-Schulz orthogonalizes. Set fsdp_version: 2 in the Accelerate config (see "
        "examples/accelerate/fsdp2.yaml), or fsdp_config={'version': 2} for the Trainer (its default)"
    )


def check_model(model: Any) -> None:
    """Refuse a model wrapped by FSDP1 (FullyShardedDataParallel): with ``use_orig_params`` its parameters are
    1-D shard views, which would silently route every matrix to AdamW."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        return
    modules = model.modules() if hasattr(model, "modules") else []
    if any(isinstance(m, FullyShardedDataParallel) for m in modules):
        raise _fsdp1_error(1)


# ------------------------------------------------------------------------------------- local views
def _wrap_rows(local: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A local row shard -> DTensor with p's mesh and placements and the global shape (m, *local.shape[1:])."""
    shape = (p.shape[0], *local.shape[1:])
    stride = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
    return DTensor.from_local(
        local.contiguous(), p.device_mesh, p.placements, run_check=False, shape=torch.Size(shape), stride=stride
    )


def _local_rows(value: torch.Tensor, start: int, count: int, m: int) -> torch.Tensor:
    """The local rows of a row-sharded state entry: its DTensor shard, or a slice of a full plain tensor."""
    if is_dtensor(value):
        return value.to_local()
    return value[start : start + count] if value.size(0) == m else value


@contextmanager
def _local_state(
    state: dict, p: torch.Tensor, start: int, count: int, sharded: Callable[[str], bool]
) -> Iterator[dict]:
    """This rank's view of ``state``: the entries sharded like ``p`` (``sharded(key)``, never the step count) as
    its rows [start, start + count); on exit every such entry, new ones included, goes back as a DTensor."""
    is_sharded = lambda key, value: key != "step" and sharded(key)  # noqa: E731
    local = {k: _local_rows(v, start, count, p.shape[0]) if is_sharded(k, v) else v for k, v in state.items()}
    yield local
    for key, value in local.items():
        state[key] = _wrap_rows(value, p) if is_sharded(key, value) else value


def _every_entry(key: str) -> bool:
    return True


# ------------------------------------------------------------------------------------------ backend
class FSDP2Backend:
    """One MuonQ step over DTensor (FSDP2) parameters; plain parameters in the same optimizer run whole."""

    sharded = True
    capturable = False  # rows exchanged with collectives at each step: no recorded step (muonq_hf.graphs)

    def __init__(self, momentum: MomentumStage) -> None:
        self.momentum = momentum

    def all_finite(self, grads: list[torch.Tensor]) -> bool:
        mesh = next((g.device_mesh for g in grads if is_dtensor(g)), None)
        groups = [mesh.get_group(d) for d in range(mesh.ndim)] if mesh is not None else [None]
        return all_finite(grads, groups, agree=True)  # every rank of the mesh: each of its dims in turn

    def step(self, tasks: list[Task], states: States) -> None:
        by_mesh: dict[Any, list[tuple[Task, MatrixPlan]]] = {}  # 2-D matrices: row-sharded, NS on an owner
        for task in tasks:
            p, group = task.param, task.group
            if p.grad is None:
                continue
            if not is_dtensor(p):
                whole_step(self.momentum, task, states[p])
            elif not group["use_muon"]:
                self._adamw(task, states[p])
            elif (plan := plan_of(p, group)).stacked:
                self._experts(task, plan, states[p])
            else:
                by_mesh.setdefault((p.device_mesh, len(p.placements)), []).append((task, plan))
        for matrices in by_mesh.values():
            self._matrices(row_group(matrices[0][0].param), matrices, states)

    @staticmethod
    def _adamw(task: Task, state: dict) -> None:
        """AdamW is elementwise: run it on the local shard; every state tensor but the step count is row-sharded."""
        p, group = task.param, task.group
        rows = row_group(p)
        start, count = row_ranges(p.shape[0], rows.size)[rows.rank]
        quantized = adamw_quantized(tuple(p.shape), group)  # the global shape decides, as in one process
        with _local_state(state, p, start, count, _every_entry) as local:
            adamw_step(p.to_local(), p.grad.to_local(), local, group, quantized)

    def _experts(self, task: Task, plan: MatrixPlan, state: dict) -> None:
        """Stacked experts: each rank's whole experts take the whole step locally."""
        p, group = task.param, task.group
        if group["experts"] is not True:
            raise ValueError(
                f"MuonQ under FSDP2: a grouped conv weight (experts={group['experts']}, shape {tuple(p.shape)}) is "
                "not supported: its row shards cut through groups. Put it in an AdamW group or train without FSDP2"
            )
        rows = row_group(p)
        first, count = row_ranges(p.shape[0], rows.size)[rows.rank]
        G = plan.view(p.grad.to_local().float())  # (count, m, n): this rank's experts
        with _local_state(state, p, first, count, _every_entry) as local:
            X = self.momentum(plan, G, local, group, task.index, experts=(first, p.shape[0]))
        update = orthogonalized_update(plan, X, group)
        apply_update(p.to_local(), update, group["lr"], group["weight_decay"])  # the local shard shares p's storage

    def _matrices(self, rows: RowGroup, matrices: list[tuple[Task, MatrixPlan]], states: States) -> None:
        """Row-sharded 2-D matrices of one row group: momentum on local rows, then NS round by round on the owners
        (under HSDP in each replica group alike)."""
        pg, world, rank = rows.group, rows.size, rows.rank
        owners = assign_owners([plan.m * plan.n * min(plan.m, plan.n) for _, plan in matrices], world)  # NS flops
        for round_ in rounds(owners):
            shards = []
            for i in round_:
                task, plan = matrices[i]
                p, group = task.param, task.group
                start, count = row_ranges(plan.m, world)[rank]
                layout = QuantizedMomentum(plan, group)
                G = p.grad.to_local().float().reshape(1, count, plan.n)  # (1, count, n): this rank's rows
                with _local_state(states[p], p, start, count, layout.is_row) as local:
                    X = self.momentum(
                        plan, G, local, group, task.index, start=start, count=count,
                        row_sum=all_reduce(dist.ReduceOp.SUM, pg), row_max=all_reduce(dist.ReduceOp.MAX, pg),
                    )  # (1, count, n); NS is deferred: it runs once, on the owner rank of this matrix
                X = X[0].to(ns_dtype(group))  # gathered in the NS dtype: half the bytes in bf16
                shards.append(RowShard(plan, group, owners[i], count, -(-plan.m // world), X))
            updates = orthogonalize_on_owners(shards, pg, world, rank)
            for i, update in zip(round_, updates, strict=True):
                task = matrices[i][0]
                apply_update(task.param.to_local(), update, task.group["lr"], task.group["weight_decay"])

    # -------------------------------------------------------------------------------- checkpoints
    @contextmanager
    def full_state(self, tasks: list[Task], states: States) -> Iterator[None]:
        yield  # DTensor state entries are saved and resharded by torch.distributed.checkpoint

    def keep_local(self, tasks: list[Task], states: States) -> None:
        return None
