"""One process, replicated DDP and DDP with ``ddp_shard_state`` (ZeRO-1 by whole tensors): one loop.

Each Muon matrix (and each 0-dim tensor) has one owner rank (``assign_owners`` by state bytes): only the owner
keeps its state, runs its whole step and broadcasts the new weights. AdamW tensors, being elementwise, are
split by rows like FSDP's Shard(0) (one embedding would otherwise dominate a rank): each rank keeps the moments
of its rows, updates them and broadcasts them. Both give the same bits as the replicated optimizer. A single
process, and every rank of a replicated DDP run, is the world-size-1 case: it owns everything, broadcasts
nothing. With ``ddp_shard_state`` ``state_dict()`` is collective (every rank must call it, as
``torch.distributed.checkpoint`` does) and returns the full state on every rank; ``load_state_dict`` keeps
this rank's part (``keep_local``), so a checkpoint loads on any number of ranks.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from ..adamw import adamw_step, adamw_steps
from ..banks import BankCache
from ..state import adamw_quantized
from ..weights import Place
from .common import (
    MomentumStage,
    Task,
    adamw_batches,
    all_finite,
    assign_owners,
    batch_budget,
    global_rank,
    muon_groups,
    row_ranges,
    state_cost,
    whole_muon_steps,
    whole_step,
)

States = MutableMapping[torch.Tensor, dict]


class OwnerBackend:
    """Whole-matrix owners over ``world`` ranks of ``group`` (world 1: one process, nothing is sent)."""

    def __init__(
        self, momentum: MomentumStage, group: Any = None, world: int = 1, rank: int = 0, batch: int | None = None,
        grouped: bool = True,
    ) -> None:
        self.momentum, self.group, self.world, self.rank = momentum, group, world, rank
        self.sharded = world > 1  # the state is split across ranks
        self.batch = batch  # gradient elements of a shape group (common.muon_groups); None: by device; 0: one each
        self.grouped = grouped  # False: a replaced momentum stage (a baseline), run parameter by parameter
        self.banks = BankCache()  # the shape groups' stacked states (muonq_hf.banks)
        # a CUDA graph can record this step (muonq_hf.graphs): nothing is sent, every matrix goes through the banks
        self.capturable = not self.sharded and grouped

    @classmethod
    def ddp(
        cls, momentum: MomentumStage, group: Any = None, batch: int | None = None, grouped: bool = True
    ) -> OwnerBackend:
        return cls(momentum, group, dist.get_world_size(group), dist.get_rank(group), batch, grouped)

    def owners(self, tasks: list[Task]) -> list[int | None]:
        """Owner rank of each task (None: an AdamW tensor split by rows), identical on every rank."""
        owned = [i for i, t in enumerate(tasks) if t.group["use_muon"] or t.param.ndim == 0]
        ranks = assign_owners([state_cost(tuple(tasks[i].param.shape), tasks[i].group) for i in owned], self.world)
        out: list[int | None] = [None] * len(tasks)
        for i, r in zip(owned, ranks, strict=True):
            out[i] = r
        return out

    def all_finite(self, grads: list[torch.Tensor]) -> bool:
        return all_finite(grads, self.group, agree=self.sharded)

    def step(self, tasks: list[Task], states: States) -> None:
        sent: list[tuple[torch.Tensor, int]] = []  # (new values, the rank that has them), sent to all after the step
        owners = self.owners(tasks)
        stepped: set[int] = set()
        if self.grouped:  # this rank's Muon matrices by shape groups (a lone matrix is a group of one)
            mine = [t for t, owner in zip(tasks, owners, strict=True) if owner == self.rank]
            for same in muon_groups(mine, states, self.batch):
                whole_muon_steps(same, [states[t.param] for t in same], self.banks)
                stepped.update(id(t.param) for t in same)
            self.banks.sweep()
        if self.batch != 0:  # in one process the small AdamW tensors (biases, norms) go through foreach ops
            for batch in adamw_batches(tasks if not self.sharded else [], states, self.batch):
                params = [t.param for t in batch]
                adamw_steps([p.data for p in params], [p.grad for p in params], [states[p] for p in params],
                            batch[0].group)
                stepped.update(id(p) for p in params)
        for task, owner in zip(tasks, owners, strict=True):
            p, group = task.param, task.group
            if p.grad is None:  # DDP reduces every gradient: the same params have grads on every rank
                continue
            if owner is not None:  # a Muon matrix (or a 0-dim tensor): stepped whole by its owner
                if owner == self.rank and id(p) not in stepped:
                    whole_step(self.momentum, task, states[p])
                sent.append((p.data, owner))
                continue
            if id(p) in stepped:
                continue
            ranges = row_ranges(p.shape[0], self.world)  # an AdamW tensor: each rank steps its rows
            start, count = ranges[self.rank]
            if count or not self.sharded:  # (one process steps even an empty tensor, as torch's AdamW)
                rows = slice(start, start + count)
                adamw_step(p.data[rows], p.grad[rows], states[p], group, adamw_quantized(tuple(p.shape), group),
                           task.index, Place(start))
            for r, (start_r, count_r) in enumerate(ranges):
                if count_r:  # rows of a contiguous tensor: a contiguous view, filled in place by the broadcast
                    sent.append((p.data[start_r : start_r + count_r], r))
        if self.sharded:
            self._broadcast_all(sent)

    def _broadcast_all(self, sent: list[tuple[torch.Tensor, int]]) -> None:
        """Every rank gets the new values of every (tensor, source rank): the tensors of one source and dtype are
        packed into buckets of up to ``BATCH_ELEMENTS`` elements, one broadcast per bucket (not one per tensor:
        each is a network latency across nodes), and unpacked in place."""
        by_source: dict[tuple[int, torch.dtype, torch.device], list[torch.Tensor]] = {}
        for t, src in sent:
            by_source.setdefault((src, t.dtype, t.device), []).append(t)
        works = []
        for (src, _, _), tensors in by_source.items():
            limit = max(1, batch_budget(tensors[0], self.batch))
            bucket: list[torch.Tensor] = []
            for t in [*tensors, None]:
                if bucket and (t is None or sum(b.numel() for b in bucket) + t.numel() > limit):
                    works.append(self._broadcast_bucket(bucket, src))
                    bucket = []
                if t is not None:
                    bucket.append(t)
        for work, bucket, flat in works:
            work.wait()
            if flat is not None:  # received: unpack into the tensors
                torch._foreach_copy_(bucket, [v.view_as(t) for v, t in zip(flat.split([t.numel() for t in bucket]),
                                                                          bucket, strict=True)])

    def _broadcast_bucket(self, bucket: list[torch.Tensor], src: int) -> tuple[Any, list[torch.Tensor], Any]:
        """Start one broadcast of ``bucket`` (packed, unless it is one contiguous tensor) from rank ``src``."""
        if len(bucket) == 1 and bucket[0].is_contiguous():
            flat, unpack = bucket[0].view(-1), None
        else:
            flat = torch.cat([t.reshape(-1) for t in bucket])
            unpack = flat if self.rank != src else None
        work = dist.broadcast(flat, src=global_rank(self.group, src), group=self.group, async_op=True)
        return work, bucket, unpack

    # -------------------------------------------------------------------------------- checkpoints
    @contextmanager
    def full_state(self, tasks: list[Task], states: States) -> Iterator[None]:
        """Temporarily give every rank the full state (collective); this rank's own part is restored afterwards.

        Tensors are gathered through CPU pickles (device-free); Muon states come whole from their owners, AdamW
        states are concatenated from the row parts (the step count is the same on every rank)."""
        if not self.sharded:
            yield
            return
        owner = self.owners(tasks)
        params = [t.param for t in tasks]
        mine = {
            i: {k: v.cpu() if torch.is_tensor(v) else v for k, v in states[p].items()}
            for i, p in enumerate(params)
            if states.get(p) and owner[i] in (None, self.rank)  # state is a defaultdict: skip empty entries
        }
        parts: list[dict] = [None] * self.world  # type: ignore[list-item]
        dist.all_gather_object(parts, mine, group=self.group)
        saved = {p: states[p] for p in params if p in states}
        for i, p in enumerate(params):
            pieces = [part[i] for part in parts if i in part]
            if not pieces:
                continue
            if owner[i] is not None:
                full = pieces[0]
            else:
                full = {k: torch.cat([x[k] for x in pieces]) if v.ndim else v for k, v in pieces[0].items()}
            states[p] = {k: v.to(p.device) if torch.is_tensor(v) else v for k, v in full.items()}
        try:
            yield
        finally:
            for p in params:
                states.pop(p, None)
                if p in saved:
                    states[p] = saved[p]

    def keep_local(self, tasks: list[Task], states: States) -> None:
        """After a full load: drop the Muon states owned elsewhere and keep this rank's rows of AdamW states."""
        if not self.sharded:
            return
        for task, owner in zip(tasks, self.owners(tasks), strict=True):
            p = task.param
            if owner is not None:
                if owner != self.rank:
                    states.pop(p, None)
            elif p in states:
                start, count = row_ranges(p.shape[0], self.world)[self.rank]
                if count == 0:
                    states.pop(p)
                    continue
                states[p] = {
                    k: v[start : start + count].clone() if torch.is_tensor(v) and v.ndim else v
                    for k, v in states[p].items()
                }
