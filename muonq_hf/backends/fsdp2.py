"""DTensor parameters: FSDP2 (``fully_shard``, ``Shard(0)`` on a 1-D mesh), HSDP (``(Replicate(), Shard(0))``) and
tensor-parallel layouts: row-sharded state, one Newton-Schulz per matrix in each row group.

Layouts (``row_group``): under FSDP2 the rows of a matrix are shared by the mesh's ranks; under HSDP by the
ranks of the shard dim, each replica group stepping alike. Any other layout (tensor parallel's colwise
``(_StridedShard(0), Shard(0))`` or rowwise ``(Shard(0), Shard(1))`` after ``fully_shard`` on the dp dim, a
column-sharded matrix on one dim) is *gathered*: the whole gradient is gathered (``full_tensor``), its rows are
split over all ranks of the mesh as under FSDP2 (the state a ``Shard(0)`` DTensor on the flattened mesh), and
the update is gathered again and cut to the weight's own layout. The matrix plan holds in every layout: a
colwise-sharded fused QKV is still cut into q, k and v.

Each rank keeps the state of its own rows only (docs/design.md, "State layout"): row entries of the
``QuantizedMomentum`` are DTensors with the row group's mesh and placements (built with the global shape, so
uneven and empty shards work), batch entries (per-matrix scales, R) are plain tensors, identical on every rank.

FSDP2 and HSDP matrices are stepped whole on owner ranks (``FSDP2Backend._on_owners``): every matrix has an
owner (``assign_owners`` by NS cost); in rounds of up to ``BATCH_ELEMENTS`` gradient elements per owner, one
all-to-all brings each matrix's gradient rows and state rows to its owner, which assembles them and takes the
one-process step (momentum and Newton-Schulz on the whole matrix: the single-process values, stochastic rounding
included), and one all-to-all sends each rank its update rows, its state rows and its copy of the per-matrix
entries. Collectives per step: two per round (a 12-layer GPT-2 on 2 ranks: 6, where one step per matrix with its
own reductions made 385). Memory: an owner holds the whole gradients and states of one round's matrices.

Gathered (tensor-parallel) matrices take the momentum stage on their local rows with all-reduced norms, Gram
matrices, R and absmax (``row_sum`` / ``row_max``), and Newton-Schulz on owners round by round
(``orthogonalize_on_owners``): a dozen collectives per matrix. Fused pieces (``qkv_split``) of any ``split_dim``
are handled there by padding: the local rows of each piece are laid out as (k, L, w) with zero rows (zero codes)
where a rank holds fewer rows of a piece; zero rows add nothing to any norm, Gram matrix, R or absmax, and are
dropped again before the state is stored. With round-to-nearest (the default) the codes equal the single-process
ones up to fp32 reduction-order noise; stochastic rounding draws each rank's noise for its padded local block
from the same keyed generator (unbiased, not the single-process bits).

Stacked experts (E, m, n) under Shard(0): each rank holds whole experts, so their whole step is local (no
reduction, no gather); every state entry is sharded on the expert dim like the weight. Plain (non-DTensor)
parameters in the same optimizer take the one-process path.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..adamw import adamw_step
from ..matrices import MatrixPlan, plan_of
from ..momentum import apply_update, ns_dtype, orthogonalized_update, rounding_for
from ..state import QuantizedMomentum, adamw_quantized
from ..weights import KAHAN, ORIGIN, Place, rounded_weight
from .common import (
    MomentumStage,
    RowShard,
    Task,
    all_finite,
    all_reduce,
    assign_owners,
    batch_budget,
    orthogonalize_on_owners,
    rounds,
    row_ranges,
    whole_muon_update,
    whole_step,
)

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
except ImportError:  # torch built without distributed support
    DTensor = Replicate = Shard = distribute_tensor = None  # type: ignore[assignment,misc]

States = MutableMapping[torch.Tensor, dict]


def is_dtensor(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


# ------------------------------------------------------------------------------------------- refusals
def check_parameter(p: torch.Tensor) -> None:
    """Refuse layouts the row-sharded state cannot follow: FSDP1 flat parameters and pending reductions
    (``Partial``)."""
    if getattr(p, "_is_flat_param", False) or type(p).__name__ == "FlatParameter":
        raise ValueError(
            "MuonQ does not support FSDP1 (FullyShardedDataParallel flat parameters): Newton-Schulz needs each "
            "weight matrix, which a flat parameter hides. Use FSDP2 (torch.distributed.fsdp.fully_shard; in "
            "Accelerate fsdp_version: 2, see examples/accelerate/fsdp2.yaml)"
        )
    if not is_dtensor(p):
        return
    bad = [pl for pl in p.placements if pl.is_partial()]
    if bad:
        raise ValueError(
            f"MuonQ supports DTensor parameters that are sharded or replicated on each mesh dim (FSDP2, HSDP, "
            f"tensor parallel), got placements {tuple(p.placements)} for a parameter of shape {tuple(p.shape)}: "
            f"{bad[0]} is a pending reduction, not a parameter's layout"
        )


@dataclass(frozen=True)
class RowGroup:
    """The ranks that share a Muon matrix's rows and how its row-sharded state is laid out.

    FSDP2 (``(Shard(0),)``) and HSDP (``(Replicate(), Shard(0))``): the ranks of the mesh's Shard(0) dim, the state
    laid out like the weight; under HSDP each replica group is one such group (docs/design.md, "Backends").
    Any other layout (tensor parallel: ``(_StridedShard(0), Shard(0))`` of a colwise weight, ``(Shard(0), Shard(1))``
    of a rowwise one, ...) is ``gathered``: the gradient is gathered whole, the rows of the momentum step and its
    state are split over all ranks of the mesh (a flattened 1-D mesh, ``Shard(0)``), and the update is gathered
    back and cut to the weight's own layout."""

    group: Any
    size: int
    rank: int
    mesh: Any  # the mesh and placements of the row-sharded state entries
    placements: tuple
    gathered: bool


def row_group(p: torch.Tensor) -> RowGroup:
    """The row group of DTensor ``p``."""
    mesh, placements = p.device_mesh, tuple(p.placements)
    if placements in ((Shard(0),), (Replicate(), Shard(0))):
        dim = len(placements) - 1
        return RowGroup(mesh.get_group(dim), mesh.size(dim), mesh.get_local_rank(dim), mesh, placements, False)
    flat = _flattened(mesh)
    return RowGroup(flat.get_group(), flat.size(), flat.get_local_rank(), flat, (Shard(0),), True)


_FLATTENED: dict[Any, Any] = {}


def _flattened(mesh: Any) -> Any:
    """``mesh`` as a 1-D mesh over all its ranks (made once per mesh: a process group, created by every rank)."""
    if mesh.ndim == 1:
        return mesh
    if mesh not in _FLATTENED:
        names = mesh.mesh_dim_names
        _FLATTENED[mesh] = mesh._flatten("_".join(names) if names else None)
    return _FLATTENED[mesh]


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
@dataclass(frozen=True)
class Layout:
    """How the sharded entries of one state are laid out: on ``mesh`` with ``placements``, each entry's global
    shape that of ``like`` where its local shape is ``like``'s local one, else (``rows``, its own other dims):
    row entries (codes, P, 8-bit absmax) sharded on dim 0 only."""

    mesh: Any
    placements: tuple
    rows: int
    local_shape: tuple = ()
    global_shape: tuple = ()

    def wrap(self, local: torch.Tensor) -> torch.Tensor:
        """A local shard -> DTensor with the global shape."""
        same = tuple(local.shape) == self.local_shape
        shape = self.global_shape if same else (self.rows, *local.shape[1:])
        stride = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
        return DTensor.from_local(
            local.contiguous(), self.mesh, self.placements, run_check=False, shape=torch.Size(shape), stride=stride
        )

    def local(self, value: torch.Tensor) -> torch.Tensor:
        """This rank's part of an entry: its DTensor shard, or the shard of a whole plain tensor (a loaded state)."""
        if is_dtensor(value):
            return value.to_local()
        if value.ndim == 0 or value.size(0) != self.rows:
            return value  # replicated: per-matrix scales, R
        return distribute_tensor(value, self.mesh, self.placements, src_data_rank=None).to_local()


def param_layout(p: torch.Tensor) -> Layout:
    """The layout of an AdamW or expert state: ``p``'s own."""
    return Layout(p.device_mesh, tuple(p.placements), p.shape[0], tuple(p.to_local().shape), tuple(p.shape))


def local_place(p: torch.Tensor) -> Place:
    """The place of ``p``'s local block in ``p`` viewed as (shape[0], rest), which keys the noise of
    ``weight_update="stochastic"`` (``muonq_hf.weights``): Replicate and Shard(0) placements, Shard(1) of a matrix."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    fits = lambda pl: pl.is_replicate() or (type(pl) is Shard and (pl.dim == 0 or (pl.dim == 1 and p.ndim == 2)))  # noqa: E731
    if not all(map(fits, p.placements)):
        raise ValueError(
            f"MuonQ: weight_update='stochastic' keys its noise by each element's place in the whole parameter, which "
            f"placements {tuple(p.placements)} (shape {tuple(p.shape)}) do not lay out as a block of rows or columns; "
            "use weight_update='kahan' for it. No state or weight was changed"
        )
    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return Place(offset[0], offset[1] if p.ndim == 2 else 0, math.prod(p.shape[1:]))


def _noise_place(p: torch.Tensor, group: dict) -> Place:
    """``local_place`` where the noise needs it (a stochastically rounded weight), else the origin."""
    return local_place(p) if group["weight_update"] == "stochastic" and rounded_weight(p, group) else ORIGIN


def _apply_to_shard(task: Task, state: dict, update: torch.Tensor) -> None:
    """``apply_update`` of ``update`` to the local shard of ``task``'s DTensor (it shares the parameter's storage); a
    low-precision weight's Kahan buffer is laid out like the weight, its noise keyed by the shard's place."""
    p, group = task.param, task.group
    weight = p.to_local()
    with _local_state(state, param_layout(p), lambda key: key == KAHAN) as local:
        rounding = rounding_for([weight], group, [local], [task.index], [_noise_place(p, group)])
        apply_update(weight, update.reshape(weight.shape), group["lr"], group["weight_decay"], rounding)


@contextmanager
def _local_state(state: dict, layout: Layout, sharded: Callable[[str], bool]) -> Iterator[dict]:
    """This rank's view of ``state``: the entries sharded by ``layout`` (``sharded(key)``, never the step count) as
    local tensors; on exit every such entry, new ones included, goes back as a DTensor."""
    is_sharded = lambda key, value: key != "step" and sharded(key)  # noqa: E731
    local = {k: layout.local(v) if is_sharded(k, v) else v for k, v in state.items()}
    yield local
    for key, value in local.items():
        state[key] = layout.wrap(value) if is_sharded(key, value) else value


def _every_entry(key: str) -> bool:
    return True


@dataclass
class _Item:
    """One matrix of a round of ``FSDP2Backend._on_owners``: its task, plan, owner rank and every rank's rows."""

    task: Task
    plan: MatrixPlan
    owner: int
    ranges: list[tuple[int, int]]  # (start, count) of each rank

    @property
    def param(self) -> torch.Tensor:
        return self.task.param

    @functools.cached_property
    def momentum(self) -> QuantizedMomentum:
        return QuantizedMomentum(self.plan, self.task.group)

    def row_keys(self, state: dict) -> list[str]:
        """The row entries ``state`` holds now (none before the first step), in a fixed order."""
        return sorted(k for k in state if self.momentum.is_row(k))

    @functools.cached_property
    def schema(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The entries after a step, row entries first, each part in a fixed order."""
        schema = self.momentum.schema()
        order = sorted(schema, key=lambda k: (not self.momentum.is_row(k), k))
        return {k: schema[k] for k in order}

    def back_specs(self, count: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
        """(shape, dtype) of what a rank with ``count`` rows gets back: update rows, row entries, shared entries."""
        specs = [((count, self.plan.n), ns_dtype(self.task.group))]
        for key, (shape, dtype) in self.schema.items():
            specs.append(((count, *shape[1:]), dtype) if self.momentum.is_row(key) else (shape, dtype))
        return specs


def owner_rounds(owners: list[int], sizes: list[int], budget: int) -> list[list[int]]:
    """Consecutive runs of items in which each owner holds at most ``budget`` elements (at least one item)."""
    out: list[list[int]] = []
    load: dict[int, int] = {}
    for i, (owner, size) in enumerate(zip(owners, sizes, strict=True)):
        if not out or (load.get(owner, 0) and load[owner] + size > budget):
            out.append([])
            load = {}
        out[-1].append(i)
        load[owner] = load.get(owner, 0) + size
    return out


def _local(value: torch.Tensor) -> torch.Tensor:
    return value.to_local() if is_dtensor(value) else value


def _assemble(parts: list[torch.Tensor]) -> torch.Tensor:
    """A whole matrix (or row entry) from every rank's rows, in rank order."""
    return torch.cat(parts)


def _all_to_all(
    send: list[list[torch.Tensor]], specs: list[list[tuple[tuple[int, ...], torch.dtype]]], group: Any
) -> list[list[torch.Tensor]]:
    """One ``all_to_all_single`` of tensors of any shapes and dtypes: ``send[dst]`` goes to rank ``dst``, and what
    comes from rank ``src`` is read as tensors of ``specs[src]`` (shape, dtype), in order."""
    def raw(t: torch.Tensor) -> torch.Tensor:
        return t.contiguous().reshape(-1).view(torch.uint8) if t.numel() else t.new_empty(0, dtype=torch.uint8)

    chunks = [[raw(t) for t in tensors] for tensors in send]
    sent = [sum(c.numel() for c in chunk) for chunk in chunks]
    sizes = [[math.prod(shape) * dtype.itemsize for shape, dtype in spec] for spec in specs]
    device = next((t.device for tensors in send for t in tensors), torch.device("cpu"))
    buffer = torch.cat([c for chunk in chunks for c in chunk]) if any(sent) else torch.empty(0, dtype=torch.uint8,
                                                                                              device=device)
    out = torch.empty(sum(map(sum, sizes)), dtype=torch.uint8, device=buffer.device)
    dist.all_to_all_single(out, buffer, [sum(s) for s in sizes], sent, group=group)
    received, offset = [], 0
    for spec, size in zip(specs, sizes, strict=True):
        tensors = []
        for (shape, dtype), nbytes in zip(spec, size, strict=True):
            tensors.append(out[offset : offset + nbytes].clone().view(dtype).reshape(shape))  # aligned copy
            offset += nbytes
        received.append(tensors)
    return received


def _whole_rows(rows: torch.Tensor, m: int, group: Any, world: int) -> torch.Tensor:
    """The (m, n) matrix whose row shards (``row_ranges(m, world)``) the ranks of ``group`` hold: one all-gather
    of the padded shards."""
    chunk = -(-m // world)
    padded = rows.new_zeros(chunk, rows.size(-1))
    padded[: rows.size(0)] = rows
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat(parts)[:m]


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
        for task in tasks:  # every layout this step cannot take is refused before anything changes
            if task.param.grad is not None and is_dtensor(task.param):
                self._check(task)
        by_rows: dict[RowGroup, list[tuple[Task, MatrixPlan]]] = {}  # 2-D matrices: row-sharded, NS on an owner
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
                by_rows.setdefault(row_group(p), []).append((task, plan))
        for rows, matrices in by_rows.items():
            if rows.gathered:
                self._matrices(rows, matrices, states)
            else:
                self._on_owners(rows, matrices, states)

    @staticmethod
    def _check(task: Task) -> None:
        """Refuse a DTensor parameter whose layout its step cannot take, naming it: called for every parameter
        before the first one steps, so a refusal changes nothing."""
        p, group = task.param, task.group
        _noise_place(p, group)  # stochastic weight updates need a block of rows or columns
        if not group["use_muon"]:
            rows_whole = all(pl.is_replicate() or getattr(pl, "dim", 0) == 0 for pl in p.placements)
            if adamw_quantized(tuple(p.shape), group) and not rows_whole:
                raise ValueError(
                    f"MuonQ: adamw_bits=8 needs the rows of a parameter whole on each rank (its blocks run along "
                    f"rows), got placements {tuple(p.placements)} for shape {tuple(p.shape)}; put it in a group "
                    "with adamw_bits=32. No state or weight was changed"
                )
        elif plan_of(p, group).stacked:
            if group["experts"] is not True:
                raise ValueError(
                    f"MuonQ under FSDP2: a grouped conv weight (experts={group['experts']}, shape {tuple(p.shape)}) "
                    "is not supported: its row shards cut through groups. Put it in an AdamW group or train "
                    "without FSDP2. No state or weight was changed"
                )
            if row_group(p).gathered:
                raise ValueError(
                    f"MuonQ: stacked experts (shape {tuple(p.shape)}) with placements {tuple(p.placements)} are not "
                    "supported: a rank must hold whole experts (FSDP2 or HSDP Shard(0) on the expert dim). No state "
                    "or weight was changed"
                )

    @staticmethod
    def _adamw(task: Task, state: dict) -> None:
        """AdamW is elementwise: run it on the local shard; every state tensor but the step count is laid out like
        the weight."""
        p, group = task.param, task.group
        quantized = adamw_quantized(tuple(p.shape), group)  # the global shape decides, as in one process
        with _local_state(state, param_layout(p), _every_entry) as local:
            adamw_step(p.to_local(), p.grad.to_local(), local, group, quantized, task.index, _noise_place(p, group))

    def _experts(self, task: Task, plan: MatrixPlan, state: dict) -> None:
        """Stacked experts: each rank's whole experts take the whole step locally."""
        p, group = task.param, task.group
        rows = row_group(p)
        first, count = row_ranges(p.shape[0], rows.size)[rows.rank]
        G = plan.view(p.grad.to_local().float())  # (count, m, n): this rank's experts
        with _local_state(state, param_layout(p), _every_entry) as local:
            X = self.momentum(plan, G, local, group, task.index, experts=(first, p.shape[0]))
        _apply_to_shard(task, state, orthogonalized_update(plan, X, group))

    def _on_owners(self, rows: RowGroup, matrices: list[tuple[Task, MatrixPlan]], states: States) -> None:
        """Row-sharded 2-D matrices of one row group (FSDP2, HSDP), each stepped whole on an owner rank.

        In rounds of up to ``BATCH_ELEMENTS`` gradient elements per owner: one all-to-all brings each matrix's
        gradient rows and state rows to its owner; the owner assembles them and takes the one-process step
        (``whole_muon_update``: momentum, Newton-Schulz, the values of one process); one all-to-all sends each rank
        its update rows, its state rows and its copy of the per-matrix entries. Two collectives per round."""
        world, rank = rows.size, rows.rank
        plans = [plan for _, plan in matrices]
        owners = assign_owners([plan.m * plan.n * min(plan.m, plan.n) for plan in plans], world)  # NS flops
        budget = max(1, batch_budget(matrices[0][0].param, None))
        for round_ in owner_rounds(owners, [plan.m * plan.n for plan in plans], budget):
            items = [_Item(*matrices[i], owners[i], row_ranges(matrices[i][1].m, world)) for i in round_]
            # 1. to the owners: [gradient rows (count, n) fp32, row entries (count, W)] of each matrix
            send = [[] for _ in range(world)]
            specs: list[list[tuple]] = [[] for _ in range(world)]
            for item in items:
                state = states[item.param]
                send[item.owner] += [item.param.grad.to_local().float().reshape(-1, item.plan.n)]
                send[item.owner] += [_local(state[k]) for k in item.row_keys(state)]
                if item.owner == rank:
                    for src, (_, count) in enumerate(item.ranges):
                        specs[src] += [((count, item.plan.n), torch.float32)]
                        specs[src] += [((count, *_local(state[k]).shape[1:]), state[k].dtype)
                                       for k in item.row_keys(state)]
            received = _all_to_all(send, specs, rows.group)
            # 2. on the owners: the whole matrices' one-process steps
            send = [[] for _ in range(world)]
            for item in items:
                if item.owner != rank:
                    continue
                state = states[item.param]
                n_parts = 1 + len(item.row_keys(state))
                parts = [received[src][:n_parts] for src in range(world)]
                received = [r[n_parts:] for r in received]
                for dst, out in enumerate(self._whole_step(item, parts, state)):
                    send[dst] += out
            # 3. back: [update rows, row entries (count, W), per-matrix entries] of each matrix, from its owner
            specs = [[] for _ in range(world)]
            for item in items:
                specs[item.owner] += item.back_specs(item.ranges[rank][1])
            back = _all_to_all(send, specs, rows.group)
            for item in items:
                n_parts = len(item.back_specs(0))
                self._take_back(item, back[item.owner][:n_parts], states[item.param], rows)
                back[item.owner] = back[item.owner][n_parts:]

    def _whole_step(self, item: _Item, parts: list[list[torch.Tensor]], state: dict) -> list[list[torch.Tensor]]:
        """On the owner: the whole gradient and state from every rank's rows (``parts[src]``), the one-process step,
        and per rank what it gets back (``_Item.back_specs``)."""
        keys = item.row_keys(state)
        whole = {k: _assemble([part[1 + j] for part in parts]) for j, k in enumerate(keys)}
        grad = _assemble([part[0] for part in parts]).reshape(item.param.shape)  # (m, n)
        full = {**{k: v for k, v in state.items() if not item.momentum.is_row(k)}, **whole}
        update = whole_muon_update(self.momentum, grad, full, item.task.group, item.task.index)[0]  # (m, n)
        schema = item.schema
        rows = [k for k in schema if item.momentum.is_row(k)]
        shared = [full[k].reshape(schema[k][0]) for k in schema if not item.momentum.is_row(k)]
        return [[update[s : s + c], *(full[k][s : s + c] for k in rows), *shared] for s, c in item.ranges]

    @staticmethod
    def _take_back(item: _Item, parts: list[torch.Tensor], state: dict, rows: RowGroup) -> None:
        """Store this rank's state rows (DTensors) and per-matrix entries, and apply its update rows."""
        schema = item.schema
        update, *entries = parts
        layout = Layout(rows.mesh, rows.placements, item.plan.m)
        for key, value in zip(schema, entries, strict=True):
            state[key] = layout.wrap(value) if item.momentum.is_row(key) else value
        _apply_to_shard(item.task, state, update)

    def _matrices(self, rows: RowGroup, matrices: list[tuple[Task, MatrixPlan]], states: States) -> None:
        """Row-sharded 2-D matrices of one row group: momentum on local rows, then NS round by round on the owners
        (under HSDP in each replica group alike). Gathered layouts (tensor parallel) take their rows from the
        whole gradient and give the update back in the weight's own layout."""
        pg, world, rank = rows.group, rows.size, rows.rank
        owners = assign_owners([plan.m * plan.n * min(plan.m, plan.n) for _, plan in matrices], world)  # NS flops
        for round_ in rounds(owners):
            shards = []
            for i in round_:
                task, plan = matrices[i]
                p, group = task.param, task.group
                start, count = row_ranges(plan.m, world)[rank]
                momentum = QuantizedMomentum(plan, group)
                grad = p.grad.full_tensor()[start : start + count] if rows.gathered else p.grad.to_local()
                G = grad.float().reshape(1, count, plan.n)  # (1, count, n): this rank's rows
                layout = Layout(rows.mesh, rows.placements, plan.m)
                with _local_state(states[p], layout, momentum.is_row) as local:
                    X = self.momentum(
                        plan, G, local, group, task.index, start=start, count=count,
                        row_sum=all_reduce(dist.ReduceOp.SUM, pg), row_max=all_reduce(dist.ReduceOp.MAX, pg),
                    )  # (1, count, n); NS is deferred: it runs once, on the owner rank of this matrix
                X = X[0].to(ns_dtype(group))  # gathered in the NS dtype: half the bytes in bf16
                shards.append(RowShard(plan, group, owners[i], count, -(-plan.m // world), X))
            updates = orthogonalize_on_owners(shards, pg, world, rank)
            for i, update in zip(round_, updates, strict=True):
                task, plan = matrices[i]
                p = task.param
                if rows.gathered:  # the whole update, then this rank's block of the weight's own layout
                    update = _whole_rows(update, plan.m, pg, world)
                    update = distribute_tensor(update, p.device_mesh, p.placements, src_data_rank=None).to_local()
                _apply_to_shard(task, states[p], update)

    # -------------------------------------------------------------------------------- checkpoints
    @contextmanager
    def full_state(self, tasks: list[Task], states: States) -> Iterator[None]:
        yield  # DTensor state entries are saved and resharded by torch.distributed.checkpoint

    def keep_local(self, tasks: list[Task], states: States) -> None:
        return None
