"""Distributed MuonQ: FSDP2 row-sharded state with distributed Newton-Schulz, and DDP whole-matrix sharding.

FSDP2 (``fully_shard``: parameters are DTensors ``Shard(0)`` on a 1-D mesh). Each rank keeps the state of
its own rows only (docs/design.md, "State layout"): the residual codes and P are DTensors with the parameter's mesh and
placements (built with the global shape, so uneven and empty shards work), the per-matrix scales and R are
plain tensors, identical on every rank. The momentum step runs on the local rows with all-reduced norms,
Gram matrices, R and absmax (``muonq_update`` with ``row_sum``/``row_max``). Newton-Schulz needs the whole
matrix: matrices are processed in rounds of ``world_size``; in a round, matrix i is gathered on rank i (in the
NS dtype: bf16 on accelerators, fp32 on CPU), orthogonalized there and its rows are scattered back. Each NS
runs once in the world, the ranks work in parallel, and a rank holds at most one full matrix at a time.

Fused pieces (``qkv_split``) of any ``split_dim`` are handled by padding: the local rows of each piece are
laid out as (k, L, w) with zero rows (zero codes) where a rank holds fewer rows of a piece; zero rows add
nothing to any norm, Gram matrix, R or absmax, and are dropped again before the state is stored.
With round-to-nearest (the default) the codes equal the single-process ones up to fp32 reduction-order noise.
With ``stochastic_rounding`` each rank draws the noise for its padded local block from the same keyed
generator, so the codes are unbiased but not the single-process bits.

DDP (``MuonQ(..., ddp_shard_state=True)`` with plain, replicated parameters): ZeRO-1. Each Muon matrix is owned
whole by one rank (greedy balance of state bytes, identical on every rank): only the owner keeps its state and
computes its update, then broadcasts the new weights. AdamW tensors are elementwise, so they are split by rows
like FSDP's Shard(0) instead (one embedding would otherwise dominate a rank). ``state_dict()`` is collective
(every rank must call it, as ``torch.distributed.checkpoint`` does) and returns the full state on every rank;
``load_state_dict`` keeps this rank's part, so a checkpoint loads on any number of ranks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from .checkpoint import adamw_quantized
from .matrices import MatrixPlan, is_row_key, plan_of
from .momentum import apply_update, momentum_step, orthogonalized_update
from .orthogonalize import ns_dtype_for

if TYPE_CHECKING:
    from .optimizer import MuonQ

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # torch built without distributed support
    DTensor = Shard = None  # type: ignore[assignment,misc]

def is_dtensor(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if is_dtensor(t) else t


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
    if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
        raise ValueError(
            f"MuonQ supports DTensor parameters sharded on dim 0 over a 1-D mesh (FSDP2 fully_shard), got "
            f"placements {tuple(p.placements)} on a {p.device_mesh.ndim}-D mesh for a parameter of shape "
            f"{tuple(p.shape)}: tensor-parallel (Shard(d>0), Replicate) and HSDP layouts are not supported. "
            "Use FSDP2 fully_shard on a 1-D mesh, or plain DDP (optionally MuonQ(ddp_shard_state=True))"
        )


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


# -------------------------------------------------------------------------------------------- rows
def row_ranges(m: int, world: int) -> list[tuple[int, int]]:
    """(start, count) of the rows of each rank under Shard(0) (torch.chunk: ceil(m/world) rows, the rest empty)."""
    chunk = -(-m // world) if m else 0
    return [(min(r * chunk, m), max(0, min((r + 1) * chunk, m) - min(r * chunk, m))) for r in range(world)]


def _all_reduce(op: Any, group: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    def reduce(t: torch.Tensor) -> torch.Tensor:
        t = t.contiguous()  # the inputs are fresh temporaries: reducing in place is safe
        dist.all_reduce(t, op=op, group=group)
        return t

    return reduce


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
    state: dict, p: torch.Tensor, start: int, count: int, sharded: Callable[[str, torch.Tensor], bool]
) -> Iterator[dict]:
    """This rank's view of ``state``: the entries sharded like ``p`` (``sharded(key, value)``) as its rows
    [start, start + count); on exit every such entry, new ones included, goes back as a DTensor like ``p``."""
    local = {k: _local_rows(v, start, count, p.shape[0]) if sharded(k, v) else v for k, v in state.items()}
    yield local
    for key, value in local.items():
        state[key] = _wrap_rows(value, p) if sharded(key, value) else value


def _not_a_scalar(key: str, value: torch.Tensor) -> bool:
    return value.ndim > 0  # every entry but the step count


# ------------------------------------------------------------------------------------------ FSDP2
@dataclass
class _Pending:
    p: torch.Tensor
    group: dict
    plan: MatrixPlan
    count: int  # local rows
    chunk: int  # rows per rank in FSDP's padded layout, ceil(m / world)
    X: torch.Tensor  # (count, n) local rows of the NS input, in the NS dtype


class FSDPEngine:
    """One MuonQ step over DTensor (FSDP2) parameters; plain parameters in the same optimizer take the local path."""

    def step(self, opt: MuonQ) -> None:
        pending: list[_Pending] = []
        for index, group, p in opt._indexed_params():
            if p.grad is None:
                continue
            check_parameter(p)
            if not is_dtensor(p):
                opt._muon_step(p, group, index) if group["use_muon"] else opt._adamw_step(p, group)
                continue
            if not group["use_muon"]:
                self._adamw(opt, p, group)
                continue
            plan = plan_of(p, group)
            if plan.stacked:
                self._experts(opt, p, group, index, plan)
                continue
            if pending and pending[0].p.device_mesh != p.device_mesh:
                self._orthogonalize_and_apply(pending)
                pending = []
            pending.append(self._momentum(opt, p, group, index, plan))
            if len(pending) == p.device_mesh.size():
                self._orthogonalize_and_apply(pending)
                pending = []
        if pending:
            self._orthogonalize_and_apply(pending)

    @staticmethod
    def _adamw(opt: MuonQ, p: torch.Tensor, group: dict) -> None:
        """AdamW is elementwise: run it on the local shard; every state tensor but the step count is row-sharded."""
        start, count = row_ranges(p.shape[0], p.device_mesh.size())[p.device_mesh.get_local_rank()]
        quantized = adamw_quantized(tuple(p.shape), group)  # the global shape decides, as in one process
        with _local_state(opt.state[p], p, start, count, _not_a_scalar) as local:
            opt._adamw_step(p.to_local(), group, grad=p.grad.to_local(), state=local, quantized=quantized)

    @staticmethod
    def _experts(opt: MuonQ, p: torch.Tensor, group: dict, index: int, plan: MatrixPlan) -> None:
        """Stacked experts (E, m, n) under Shard(0): each rank holds whole experts, so their whole MuonQ step is
        local (no reduction, no gather); every state entry is sharded on the expert dim like the weight."""
        if group["experts"] is not True:
            raise ValueError(
                f"MuonQ under FSDP2: a grouped conv weight (experts={group['experts']}, shape {tuple(p.shape)}) is "
                "not supported: its row shards cut through groups. Put it in an AdamW group or train without FSDP2"
            )
        mesh = p.device_mesh
        first, count = row_ranges(p.shape[0], mesh.size())[mesh.get_local_rank()]
        G = plan.view(p.grad.to_local().float())  # (count, m, n): this rank's experts
        with _local_state(opt.state[p], p, first, count, _not_a_scalar) as local:
            X = momentum_step(plan, G, local, group, index, experts=(first, p.shape[0]))
        update = orthogonalized_update(plan, X, group["ns_steps"])
        apply_update(p.to_local(), update, group["lr"], group["weight_decay"])  # the local shard shares p's storage

    @staticmethod
    def _momentum(opt: MuonQ, p: torch.Tensor, group: dict, index: int, plan: MatrixPlan) -> _Pending:
        mesh = p.device_mesh
        pg, world = mesh.get_group(), mesh.size()
        start, count = row_ranges(plan.m, world)[mesh.get_local_rank()]
        row_entry = lambda key, value: is_row_key(key, group["block_size"])  # noqa: E731
        G = p.grad.to_local().float().reshape(1, count, plan.n)  # (1, count, n): this rank's rows
        with _local_state(opt.state[p], p, start, count, row_entry) as local:
            X = momentum_step(
                plan,
                G,
                local,
                group,
                index,
                start,
                count,
                row_sum=_all_reduce(dist.ReduceOp.SUM, pg),
                row_max=_all_reduce(dist.ReduceOp.MAX, pg),
            )  # (1, count, n); NS is deferred: it runs once, on the owner rank of this matrix
        return _Pending(p, group, plan, count, -(-plan.m // world), X[0].to(ns_dtype_for(p.device)))

    @staticmethod
    def _orthogonalize_and_apply(pending: list[_Pending]) -> None:
        """Round of <= world matrices: matrix i is gathered on rank i, orthogonalized, and scattered back."""
        mesh = pending[0].p.device_mesh
        pg, world, rank = mesh.get_group(), mesh.size(), mesh.get_local_rank()
        works, gathered = [], None
        for i, item in enumerate(pending):
            send = item.X.new_zeros(item.chunk, item.plan.n)  # (chunk, n): FSDP's padded row block
            send[: item.count] = item.X
            bufs = [torch.empty_like(send) for _ in range(world)] if rank == i else None
            if rank == i:
                gathered = bufs
            works.append(dist.gather(send, bufs, dst=dist.get_global_rank(pg, i), group=pg, async_op=True))
        for w in works:
            w.wait()
        chunks = None
        if rank < len(pending):
            item = pending[rank]
            full = torch.cat(gathered)[: item.plan.m].unsqueeze(0)  # (1, m, n): the whole NS input, on its owner
            U = orthogonalized_update(item.plan, full, item.group["ns_steps"])[0]  # (m, n), scaled per piece
            rows = U.new_zeros(world * item.chunk, item.plan.n)
            rows[: item.plan.m] = U
            chunks = list(rows.to(item.X.dtype).chunk(world))
            del full, gathered
        works, received = [], []
        for i, item in enumerate(pending):
            recv = item.X.new_empty(item.chunk, item.plan.n)
            received.append(recv)
            src = dist.get_global_rank(pg, i)
            works.append(dist.scatter(recv, chunks if rank == i else None, src=src, group=pg, async_op=True))
        for w in works:
            w.wait()
        for item, recv in zip(pending, received, strict=True):
            local = item.p.to_local()  # shares storage with p: in-place updates change the parameter
            apply_update(local, recv[: item.count].float(), item.group["lr"], item.group["weight_decay"])


def grads_finite(grads: Iterable[torch.Tensor]) -> bool:
    """All gradients finite on every rank (local shards checked, then an all-reduce so all ranks agree)."""
    grads = list(grads)
    flags = [torch.isfinite(_local(g)).all() for g in grads]
    ok = (torch.stack(flags).all() if flags else torch.tensor(True)).to(torch.int32).reshape(1)
    group = next((g.device_mesh.get_group() for g in grads if is_dtensor(g)), None)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)
    return bool(ok.item())


# ------------------------------------------------------------------------------------ DDP sharding
class DDPShardEngine:
    """ZeRO-1 under DDP: Muon matrices are owned whole by one rank each (the owner keeps the quantized state, runs
    the MuonQ step and broadcasts the new weights); AdamW tensors, being elementwise, are split by rows like
    FSDP's Shard(0) (each rank keeps the moments of its rows, updates them, and broadcasts them). Both give the
    same bits as the replicated optimizer."""

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def _src(self, r: int) -> int:
        return dist.get_global_rank(self.group if self.group is not None else dist.group.WORLD, r)

    def owners(self, opt: MuonQ) -> list[int | None]:
        """Owner rank of each Muon parameter (None for row-split AdamW parameters): largest state first to the
        least loaded rank, identical on every rank."""
        entries = list(opt._indexed_params())
        load, owner = [0.0] * self.world, [None] * len(entries)
        muon = [i for i, (_, group, _) in enumerate(entries) if group["use_muon"] or entries[i][2].ndim == 0]
        costs = {i: _state_cost(entries[i][2], entries[i][1]) for i in muon}
        for i in sorted(muon, key=lambda i: (-costs[i], i)):
            r = min(range(self.world), key=lambda r: (load[r], r))
            owner[i] = r
            load[r] += costs[i]
        return owner

    def _rows(self, p: torch.Tensor) -> tuple[int, int]:
        return row_ranges(p.shape[0], self.world)[self.rank]

    def step(self, opt: MuonQ) -> None:
        owner = self.owners(opt)
        works = []
        for index, group, p in opt._indexed_params():
            if p.grad is None:  # DDP reduces every gradient: the same params have grads on every rank
                continue
            if owner[index] is not None:
                if owner[index] == self.rank:
                    opt._muon_step(p, group, index) if group["use_muon"] else opt._adamw_step(p, group)
                works.append(dist.broadcast(p.data, src=self._src(owner[index]), group=self.group, async_op=True))
                continue
            start, count = self._rows(p)
            if count:
                quantized = adamw_quantized(tuple(p.shape), group)
                rows = slice(start, start + count)
                opt._adamw_step(p.data[rows], group, grad=p.grad[rows], state=opt.state[p], quantized=quantized)
            for r, (start_r, count_r) in enumerate(row_ranges(p.shape[0], self.world)):
                if count_r:  # rows of a contiguous tensor: a contiguous view, filled in place by the broadcast
                    view = p.data[start_r : start_r + count_r]
                    works.append(dist.broadcast(view, src=self._src(r), group=self.group, async_op=True))
        for w in works:
            w.wait()

    @contextmanager
    def gathered(self, opt: MuonQ) -> Iterator[None]:
        """Temporarily give every rank the full state (collective); this rank's own part is restored afterwards.

        Tensors are gathered through CPU pickles (device-free); Muon states come whole from their owners, AdamW
        states are concatenated from the row parts (the step count is the same on every rank)."""
        owner = self.owners(opt)
        params = [p for _, _, p in opt._indexed_params()]
        mine = {
            i: {k: v.cpu() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
            for i, p in enumerate(params)
            if opt.state.get(p) and owner[i] in (None, self.rank)  # state is a defaultdict: skip empty entries
        }
        parts: list[dict] = [None] * self.world  # type: ignore[list-item]
        dist.all_gather_object(parts, mine, group=self.group)
        saved = {p: opt.state[p] for p in params if p in opt.state}
        for i, p in enumerate(params):
            pieces = [part[i] for part in parts if i in part]
            if not pieces:
                continue
            if owner[i] is not None:
                full = pieces[0]
            else:
                full = {k: torch.cat([x[k] for x in pieces]) if v.ndim else v for k, v in pieces[0].items()}
            opt.state[p] = {k: v.to(p.device) if torch.is_tensor(v) else v for k, v in full.items()}
        try:
            yield
        finally:
            for p in params:
                opt.state.pop(p, None)
                if p in saved:
                    opt.state[p] = saved[p]

    def localize(self, opt: MuonQ) -> None:
        """After a full load: drop the Muon states owned elsewhere and keep this rank's rows of AdamW states."""
        owner = self.owners(opt)
        for i, (_, _, p) in enumerate(opt._indexed_params()):
            if owner[i] is not None:
                if owner[i] != self.rank:
                    opt.state.pop(p, None)
            elif p in opt.state:
                start, count = self._rows(p)
                if count == 0:
                    opt.state.pop(p)
                    continue
                opt.state[p] = {
                    k: v[start : start + count].clone() if torch.is_tensor(v) and v.ndim else v
                    for k, v in opt.state[p].items()
                }


def _state_cost(p: torch.Tensor, group: dict) -> float:
    """Approximate state bytes of a parameter, to balance whole-tensor ownership across ranks."""
    if group["use_muon"]:
        return p.numel() * (4.0 if group["bits"] == 32 else group["bits"] / 8 * 1.125)  # codes + ~r/n of factors
    return p.numel() * (2.0 if group["adamw_bits"] == 8 and p.ndim >= 2 else 8.0)


def engine_for(opt: MuonQ) -> FSDPEngine | DDPShardEngine | None:
    """The distributed engine this optimizer needs now: FSDP2 if any parameter is a DTensor, DDP sharding if
    requested in a multi-rank world, else None (the single-process path)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    for p in params:
        check_parameter(p)
    if any(is_dtensor(p) for p in params):
        if getattr(opt, "ddp_shard_state", False):
            raise ValueError(
                "MuonQ: ddp_shard_state=True is for DDP (replicated parameters); under FSDP2 the state is already "
                "row-sharded with the parameters: drop ddp_shard_state"
            )
        return FSDPEngine()
    if getattr(opt, "ddp_shard_state", False) and dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            return DDPShardEngine()
    return None
