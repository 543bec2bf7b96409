"""What every backend shares: the task of one parameter, the whole-matrix Muon step, owner assignment, row
ranges, the agreed non-finite decision, and the owner-side Newton-Schulz of row-sharded matrices.

A backend decides *where* each stage of the step runs (docs/design.md, "Backends"); the stages themselves
(``muonq_hf.momentum``, ``muonq_hf.adamw``) are written once and called from here.
"""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist

from ..adamw import CHUNK_ELEMENTS, adamw_step
from ..banks import BankCache
from ..lowrank import RowSum
from ..matrices import MatrixPlan, plan_of
from ..momentum import apply_update, apply_updates, momentum_steps, orthogonalized_update, rounding_for
from ..state import adamw_quantized


@dataclass(frozen=True)
class Task:
    """One parameter of the optimizer: its position (keys its generators), its group and the tensor."""

    index: int
    group: dict
    param: torch.Tensor


class MomentumStage(Protocol):
    """The momentum stage (``muonq_hf.momentum.momentum_step``'s signature): the optimizer hands it to the
    backend, so a subclass that replaces it (a baseline) is used by every backend that can run it."""

    def __call__(
        self, plan: MatrixPlan, G: torch.Tensor, state: dict, group: dict, index: int, **rows: Any
    ) -> torch.Tensor: ...


def whole_muon_update(
    momentum: MomentumStage, grad: torch.Tensor, state: dict, group: dict, index: int
) -> torch.Tensor:
    """Momentum, then orthogonalize, of one whole parameter: the scaled update (E, m, n)."""
    plan = plan_of(grad, group)
    X = momentum(plan, plan.view(grad.float()), state, group, index)  # (E, m, n)
    return orthogonalized_update(plan, X, group)


def whole_muon_step(momentum: MomentumStage, task: Task, state: dict) -> None:
    """The three stages on one whole parameter: momentum -> orthogonalize -> apply."""
    p, group = task.param, task.group  # (>= 2-D: the step checked it, DeepSpeed's flat partitions included)
    update = whole_muon_update(momentum, p.grad, state, group, task.index)
    apply_update(p, update, group["lr"], group["weight_decay"], rounding_for([p], group, [state], [task.index]))


# Default gradient elements of one shape group (same-plan Muon parameters stepped together, ``whole_muon_steps``),
# by device type (``MuonQ(batch_elements=...)`` overrides it). A GPU step of small matrices is launch-bound (the
# H200 profile in benchmarks/RESULTS.md: ~9600 kernel launches per GPT-2 small step, one matrix at a time): a group
# runs each kernel once for all its matrices. Its transients grow with it (~6 fp32 copies of its gradients), hence
# the bound. On CPU the same holds for small matrices (per-op overhead); the bound there keeps a group's
# transients within those of one 768 x 3072 matrix.
BATCH_ELEMENTS: dict[str, int] = {"cuda": 1 << 23, "cpu": 1 << 21}  # other device types: the CPU's


def batch_budget(p: torch.Tensor, budget: int | None) -> int:
    """Gradient elements of one group on ``p``'s device: ``budget``, or the device type's ``BATCH_ELEMENTS``."""
    return BATCH_ELEMENTS.get(p.device.type, BATCH_ELEMENTS["cpu"]) if budget is None else budget


def muon_groups(
    tasks: list[Task], states: MutableMapping[torch.Tensor, dict], budget: int | None = None
) -> list[list[Task]]:
    """The shape groups of the Muon parameters of ``tasks`` that have gradients: parameters of one param group,
    plan, dtype and device, all before or all past their first step, at most ``budget`` gradient elements per
    group (None: the device type's ``BATCH_ELEMENTS``; 0: one parameter per group). A parameter larger than
    half the budget, or with stochastic rounding (its noise is keyed per parameter), is a group of one."""
    by_key: dict[tuple, list[Task]] = {}
    for t in tasks:
        p, group = t.param, t.group
        if not group["use_muon"] or p.grad is None:
            continue
        alone = group["stochastic_rounding"] or 2 * p.numel() > batch_budget(p, budget)
        started = "step" in states.get(p, {})
        key = (id(group), plan_of(p, group), p.dtype, p.device, started)
        by_key.setdefault((*key, t.index) if alone else key, []).append(t)
    return [batch for same in by_key.values() for batch in _packed(same, max(1, batch_budget(same[0].param, budget)))]


def adamw_batches(
    tasks: list[Task], states: MutableMapping[torch.Tensor, dict], budget: int | None = None
) -> list[list[Task]]:
    """Small AdamW tensors of ``tasks`` that can step together (``adamw.adamw_steps``): fp32, contiguous, fp32
    moments, at most ``CHUNK_ELEMENTS`` each, same group, device and step count, at most ``budget`` elements
    per batch (None: the device type's ``BATCH_ELEMENTS``). Batches of one are left out."""
    by_key: dict[tuple, list[Task]] = {}
    for t in tasks:
        p, group = t.param, t.group
        limit = batch_budget(p, budget)
        g = p.grad
        if group["use_muon"] or g is None or g.is_sparse or p.dtype != torch.float32 or g.dtype != torch.float32:
            continue
        if adamw_quantized(tuple(p.shape), group) or p.numel() > min(CHUNK_ELEMENTS, limit // 2):
            continue
        if not (p.is_contiguous() and g.is_contiguous()):
            continue
        step = float(states[p]["step"]) if "step" in states.get(p, {}) else 0.0
        by_key.setdefault((id(group), p.device, step, limit), []).append(t)
    return [batch for (*_, limit), same in by_key.items() for batch in _packed(same, limit) if len(batch) > 1]


def _packed(tasks: list[Task], limit: int) -> list[list[Task]]:
    """``tasks`` in order, cut into batches of at most ``limit`` elements (a larger tensor is a batch alone)."""
    batches: list[list[Task]] = [[]]
    filled = 0  # elements of the last batch
    for t in tasks:
        if batches[-1] and filled + t.param.numel() > limit:
            batches.append([])
            filled = 0
        batches[-1].append(t)
        filled += t.param.numel()
    return [b for b in batches if b]


def whole_muon_steps(tasks: list[Task], states: list[dict], banks: BankCache) -> None:
    """The three stages on the k whole parameters of one shape group (``muon_groups``; k = 1 is a group too):
    one momentum stage (``momentum_steps``, the state in a bank) and one Newton-Schulz call for all their
    matrices, then one apply; the values of k ``whole_muon_step`` calls."""
    group = tasks[0].group
    plan = plan_of(tasks[0].param, group)
    bank = banks.bank(plan, states)
    Gs = [plan.view(t.param.grad.float()) for t in tasks]  # each (E, m, n)
    X = momentum_steps(bank, Gs, group, [t.index for t in tasks])  # (k E, m, n)
    updates = orthogonalized_update(bank.plan, X, group)  # (k E, m, n)
    weights = [t.param.data for t in tasks]
    rounding = rounding_for(weights, group, states, [t.index for t in tasks])
    apply_updates(weights, updates, group["lr"], group["weight_decay"], rounding)


def whole_step(momentum: MomentumStage, task: Task, state: dict) -> None:
    """The step of one whole parameter in a single process: Muon or AdamW by its group."""
    p, group = task.param, task.group
    if group["use_muon"]:
        whole_muon_step(momentum, task, state)
    else:
        adamw_step(p, p.grad, state, group, adamw_quantized(tuple(p.shape), group), task.index)


# ------------------------------------------------------------------------------------------ ranks
def row_ranges(m: int, world: int) -> list[tuple[int, int]]:
    """(start, count) of the rows of each rank under Shard(0) (torch.chunk: ceil(m/world) rows, the rest empty)."""
    chunk = -(-m // world) if m else 0
    return [(min(r * chunk, m), max(0, min((r + 1) * chunk, m) - min(r * chunk, m))) for r in range(world)]


def assign_owners(costs: list[float], world: int) -> list[int]:
    """Owner rank of each item: largest cost first to the least loaded rank (ties: lower index, lower rank).
    A function of the costs only, so every rank computes the same owners without communicating."""
    load, owner = [0.0] * world, [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += costs[i]
    return owner


def state_cost(shape: tuple[int, ...], group: dict) -> float:
    """Approximate state bytes of a parameter, to balance whole-tensor ownership across ranks."""
    numel = float(torch.Size(shape).numel())
    if group["use_muon"]:
        return numel * (4.0 if group["bits"] == 32 else group["bits"] / 8 * 1.125)  # codes + ~r/n of factors
    return numel * (2.0 if adamw_quantized(shape, group) else 8.0)


def global_rank(group: Any, rank: int) -> int:
    """The global rank of ``rank`` in process group ``group`` (None: the default group)."""
    return rank if group is None else dist.get_global_rank(group, rank)


def all_finite(grads: Iterable[torch.Tensor], group: Any = None, agree: bool = False) -> bool:
    """Whether every gradient (local shards of DTensors) is finite; with ``agree`` the ranks of ``group`` (or of
    each group of a list in turn: the dims of a 2-D mesh) take the same decision, so a non-finite value on one
    rank raises or skips on all of them."""
    local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
    # the max norm propagates inf and nan: one foreach reduction for every gradient (one launch per dtype on a GPU;
    # isfinite would write a mask of each first), then one test of the k maxima
    local = [g for g in local if g.numel()]
    maxima = torch._foreach_norm(local, float("inf"), dtype=torch.float32) if local else []
    ok = torch.isfinite(torch.stack(maxima)).all() if maxima else torch.tensor(True)
    if agree and dist.is_available() and dist.is_initialized():
        ok = ok.to(torch.int32).reshape(1)
        for g in group if isinstance(group, list) else [group]:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=g)
    return bool(ok.item())


# ------------------------------------------------------------------- NS of row-sharded matrices
@dataclass
class RowShard:
    """This rank's rows of the Newton-Schulz input of one matrix parameter (its plan's single matrix)."""

    plan: MatrixPlan
    group: dict  # its options (ns_steps, ns_dtype)
    owner: int  # rank (in the group) that orthogonalizes the whole matrix
    count: int  # local rows
    chunk: int  # rows per rank in the padded layout, ceil(m / world)
    X: torch.Tensor  # (count, n), in the NS dtype


def orthogonalize_on_owners(shards: list[RowShard], group: Any, world: int, rank: int) -> list[torch.Tensor]:
    """One round of matrices with distinct owners: each matrix's rows are gathered on its owner, orthogonalized
    and scaled there (``orthogonalized_update``), and scattered back. Returns this rank's rows (count, n) of
    each update in the NS dtype. Each NS runs once in the world, and a rank holds at most one whole matrix."""
    works, gathered = [], None
    for item in shards:
        send = item.X.new_zeros(item.chunk, item.plan.n)  # (chunk, n): the padded row block of this rank
        send[: item.count] = item.X
        bufs = [torch.empty_like(send) for _ in range(world)] if rank == item.owner else None
        if rank == item.owner:
            gathered = bufs
        works.append(dist.gather(send, bufs, dst=global_rank(group, item.owner), group=group, async_op=True))
    for w in works:
        w.wait()
    chunks = None
    mine = [item for item in shards if item.owner == rank]
    if mine:
        item = mine[0]
        full = torch.cat(gathered)[: item.plan.m].unsqueeze(0)  # (1, m, n): the whole NS input, on its owner
        U = orthogonalized_update(item.plan, full, item.group)[0]  # (m, n), scaled per piece
        rows = U.new_zeros(world * item.chunk, item.plan.n)
        rows[: item.plan.m] = U
        chunks = list(rows.to(item.X.dtype).chunk(world))
        del full, gathered
    works, received = [], []
    for item in shards:
        recv = item.X.new_empty(item.chunk, item.plan.n)
        received.append(recv)
        src = global_rank(group, item.owner)
        works.append(dist.scatter(recv, chunks if rank == item.owner else None, src=src, group=group, async_op=True))
    for w in works:
        w.wait()
    return [recv[: item.count] for item, recv in zip(shards, received, strict=True)]


def rounds(owners: list[int]) -> list[list[int]]:
    """Consecutive runs of item indices with distinct owners (a rank orthogonalizes one matrix per round)."""
    out: list[list[int]] = []
    for i, owner in enumerate(owners):
        if not out or any(owners[j] == owner for j in out[-1]):
            out.append([])
        out[-1].append(i)
    return out


def all_reduce(op: Any, group: Any) -> RowSum:
    """A reduction over the ranks of ``group`` (``row_sum``/``row_max`` of row-sharded momentum steps)."""

    def reduce(t: torch.Tensor) -> torch.Tensor:
        t = t.contiguous()  # the inputs are fresh temporaries: reducing in place is safe
        dist.all_reduce(t, op=op, group=group)
        return t

    return reduce
