"""The matrix plan of a Muon parameter: which weight matrices a tensor holds (docs/design.md, "Matrix plans").

Muon acts on the weight matrices of the network, not on tensors. A parameter is viewed as E independent
matrices of shape (m, n) (E = 1 for a plain 2-D weight or a conv kernel, E = experts for a stacked MoE
tensor (E, out, in), E = groups for a grouped conv), and each matrix may be cut into pieces along its rows
(split_dim 0) or columns (split_dim 1): fused QKV (three pieces, unequal under grouped-query attention) or
gate_up (two halves, contiguous or interleaved column by column). Every expert x piece is its own Muon matrix.

Pieces of equal shape form a *batch* and go through the optimizer together, as one (E * c, rows, cols)
tensor. The state of a parameter keeps two kinds of entries:

* row entries (residual codes, P, block scales) in the parameter's row layout, (m, W) or, for a stacked plan
  (experts or groups on dim 0), (E, m, W): row i of
  the entry belongs to row i of the matrix, so a row shard of the weight (FSDP2 ``Shard(0)``) owns a row
  shard of its state. Row pieces stack their rows (narrower pieces padded on the right to the widest);
  column pieces sit side by side, each with its own width, always contiguous (also when the weight's
  columns are interleaved: only the weight is interleaved, the state layout is ours).
* batch entries (per-matrix scales, R, norms): (c, ...) or, stacked, (E, c, ...), one set per batch; the first batch
  uses the plain key names and batch b >= 1 the prefix ``b{b}.`` (a single-batch plan is the layout of a
  plain 2-D parameter, so existing checkpoints keep their keys).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch


def batch_key(key: str, batch: int) -> str:
    """The state key of a batch entry of batch ``batch``."""
    return key if batch == 0 else f"b{batch}.{key}"


def base_key(key: str) -> str:
    """``b1.R_codes`` -> ``R_codes`` (and DeepSpeed's ``m3.b1.R_codes`` -> ``R_codes``)."""
    return key.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class MatrixPlan:
    """A parameter as ``experts`` matrices (m, n), each cut into pieces of ``sizes`` along ``split_dim``."""

    experts: int  # E: independent matrices stacked on the leading dim (1: a plain weight)
    m: int  # rows of each matrix
    n: int  # columns of each matrix
    split_dim: int = 0  # 0: pieces are row ranges, 1: column ranges
    sizes: tuple[int, ...] = ()  # piece sizes along split_dim (empty: one piece, the whole matrix)
    interleaved: bool = False  # pieces alternate element by element along split_dim (GPT-OSS gate_up)
    stacked: bool = False  # dim 0 of the parameter (and of every state entry) is the expert/group dim

    def __post_init__(self) -> None:
        sizes = self.sizes or ((self.m, self.n)[self.split_dim],)
        object.__setattr__(self, "sizes", tuple(int(s) for s in sizes))
        total = (self.m, self.n)[self.split_dim]
        if self.split_dim not in (0, 1):
            raise ValueError(f"split_dim must be 0 (rows) or 1 (columns), got {self.split_dim!r}")
        if sum(self.sizes) != total or min(self.sizes) < 1:
            raise ValueError(
                f"pieces {list(self.sizes)} must be positive and add up to dim {self.split_dim} of the "
                f"({self.m}, {self.n}) matrix ({total})"
            )
        if self.interleaved and (len(set(self.sizes)) != 1 or self.split_dim != 1):
            raise ValueError("interleaved pieces must have equal sizes and cut the columns (split_dim=1)")

    # ----------------------------------------------------------------------------------------- pieces
    @property
    def k(self) -> int:
        return len(self.sizes)

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        out = [0]
        for s in self.sizes:
            out.append(out[-1] + s)
        return tuple(out)

    def piece_shape(self, j: int) -> tuple[int, int]:
        return (self.sizes[j], self.n) if self.split_dim == 0 else (self.m, self.sizes[j])

    @cached_property
    def batches(self) -> tuple[tuple[int, ...], ...]:
        """Piece indices grouped by shape, in order of first appearance: each group is one batch."""
        by_size: dict[int, list[int]] = {}
        for j, s in enumerate(self.sizes):
            by_size.setdefault(s, []).append(j)
        return tuple(tuple(js) for js in by_size.values())

    def batch_shape(self, b: int) -> tuple[int, int]:
        return self.piece_shape(self.batches[b][0])

    def matrices(self) -> list[tuple[int, int, int]]:
        """(count, rows, cols) of every batch: count = experts x pieces of that shape."""
        return [(self.experts * len(js), *self.batch_shape(b)) for b, js in enumerate(self.batches)]

    def view(self, t: torch.Tensor) -> torch.Tensor:
        """A parameter-shaped tensor as (E, m, n) (E = local experts for a shard of an expert tensor)."""
        return t.reshape(-1, self.m, self.n) if self.stacked else t.reshape(1, self.m, self.n)

    # ---------------------------------------------------------------------- rows of a local shard
    def piece_rows(self, j: int, start: int = 0, count: int | None = None) -> tuple[int, int]:
        """Local rows [lo, hi) of piece j among the local rows [start, start + count) of the matrix."""
        count = self.m if count is None else count
        if self.split_dim == 1:
            return 0, count
        lo = min(max(start, self.offsets[j]), start + count)
        hi = max(lo, min(start + count, self.offsets[j + 1]))
        return lo - start, hi - start

    def padded_rows(self, b: int, start: int = 0, count: int | None = None) -> int:
        """L: rows of the padded local pieces of batch b (>= 1, so that an empty shard still reduces)."""
        return max(1, max(hi - lo for lo, hi in (self.piece_rows(j, start, count) for j in self.batches[b])))

    # --------------------------------------------------------------------- values of the weight
    def _cols(self, j: int) -> slice:
        if self.split_dim == 0:
            return slice(None)
        if self.interleaved:
            return slice(j, None, self.k)
        return slice(self.offsets[j], self.offsets[j + 1])

    @property
    def whole(self) -> bool:
        """One piece, the whole matrix: batch 0 is x itself, and take / put need no copy."""
        return self.k == 1

    def take(self, x: torch.Tensor, b: int, start: int = 0, count: int | None = None) -> torch.Tensor:
        """Batch b of x (E, count, n) (local rows [start, start + count)) -> (E * c, L, cols), zero-padded."""
        if self.whole and x.size(1) > 0:
            return x  # (E, count, n): the batch is x (a view; callers do not write into it)
        L = self.padded_rows(b, start, count)
        out = []
        for j in self.batches[b]:
            lo, hi = self.piece_rows(j, start, count)
            piece = x[:, lo:hi, self._cols(j)]  # (E, hi - lo, cols)
            if hi - lo < L:
                piece = torch.nn.functional.pad(piece, (0, 0, 0, L - (hi - lo)))
            out.append(piece)
        return torch.stack(out, dim=1).flatten(0, 1)  # (E * c, L, cols)

    def put(self, x: torch.Tensor, b: int, values: torch.Tensor, start: int = 0, count: int | None = None) -> None:
        """Write batch b's values (E * c, L, cols) into x (E, count, n), dropping the padding rows."""
        if values is x:
            return
        values = values.unflatten(0, (-1, len(self.batches[b])))  # (E, c, L, cols)
        for i, j in enumerate(self.batches[b]):
            lo, hi = self.piece_rows(j, start, count)
            x[:, lo:hi, self._cols(j)] = values[:, i, : hi - lo]

    # -------------------------------------------------------------------- row entries of the state
    def row_width(self, widths: list[int]) -> int:
        """W of a row entry whose piece j is ``widths[j]`` wide: the widest row piece, or the sum of columns."""
        return max(widths) if self.split_dim == 0 else sum(widths)

    def _state_cols(self, j: int, widths: list[int]) -> slice:
        if self.split_dim == 0:
            return slice(0, widths[j])
        start = sum(widths[:j])
        return slice(start, start + widths[j])

    def take_rows(
        self, rows: torch.Tensor, b: int, widths: list[int], fill: float, start: int = 0, count: int | None = None
    ) -> torch.Tensor:
        """A row entry (E, count, W) -> batch b's pieces (E * c, L, w), padded with ``fill``; for a whole plan's
        rows, the entry itself (a view: callers do not write into it)."""
        if self.whole and rows.size(1) == self.padded_rows(b, start, count):
            return rows
        L = self.padded_rows(b, start, count)
        out = rows.new_full((rows.size(0), len(self.batches[b]), L, widths[self.batches[b][0]]), fill)
        for i, j in enumerate(self.batches[b]):
            lo, hi = self.piece_rows(j, start, count)
            out[:, i, : hi - lo] = rows[:, lo:hi, self._state_cols(j, widths)]
        return out.flatten(0, 1)

    def put_rows(
        self, rows: torch.Tensor, b: int, widths: list[int], values: torch.Tensor, start: int = 0,
        count: int | None = None,
    ) -> None:
        """Write batch b's pieces (E * c, L, w) into the row entry (E, count, W)."""
        values = values.unflatten(0, (-1, len(self.batches[b])))
        for i, j in enumerate(self.batches[b]):
            lo, hi = self.piece_rows(j, start, count)
            rows[:, lo:hi, self._state_cols(j, widths)] = values[:, i, : hi - lo]


def shaped(p: torch.Tensor) -> torch.Tensor:
    """p, or a meta tensor of its own shape when DeepSpeed ZeRO-3 has partitioned it (``zero.Init`` or
    ``deepspeed.initialize``): the parameter then holds an empty tensor and keeps its shape in ``ds_shape``.
    Routing, plans and checks ask this for shapes, so a partitioned model is routed like the whole one."""
    if hasattr(p, "ds_shape"):
        return torch.empty(tuple(p.ds_shape), dtype=p.dtype, device="meta")
    return p


def plan_of(p: torch.Tensor, group: dict) -> MatrixPlan:
    """The matrix plan of a Muon parameter from its group's keys (set by ``muonq_hf.param_groups``).

    ``experts=True``: p is (E, m, n...) with E stacked matrices; ``experts`` an int g > 1: p's dim 0 holds g
    groups (grouped conv, (out, in/g, ...)). ``piece_sizes`` (explicit sizes) or ``qkv_split`` (k equal
    pieces) cut each matrix along ``split_dim``; ``interleave`` alternates them.
    """
    p = shaped(p)
    experts = group.get("experts", False)
    if experts is True:
        if p.ndim < 3:
            raise ValueError(f"experts=True needs a tensor of >= 3 dims (E, out, in), got shape {tuple(p.shape)}")
        E, m, n = p.shape[0], p.shape[1], math.prod(p.shape[2:])
    else:
        E = int(experts) if experts else 1
        if p.shape[0] % E:
            raise ValueError(f"experts={E} groups do not divide dim 0 of a parameter of shape {tuple(p.shape)}")
        m, n = p.shape[0] // E, math.prod(p.shape[1:])
    split_dim, k = group["split_dim"], group["qkv_split"]
    sizes = group.get("piece_sizes")
    if sizes is None:
        total = (m, n)[split_dim] if split_dim in (0, 1) else 0
        if k < 1 or total % k:
            raise ValueError(
                f"qkv_split={k} does not divide dim {split_dim} (size {total}) of the ({m}, {n}) matrices of a "
                f"parameter of shape {tuple(p.shape)}; use qkv_split=1 for this parameter or fix split_dim (0 or 1)"
            )
        sizes = (total // k,) * k
    try:
        interleave, stacked = bool(group.get("interleave", False)), experts is True or E > 1
        return MatrixPlan(E, m, n, split_dim, tuple(sizes), interleave, stacked)
    except ValueError as e:
        raise ValueError(f"parameter of shape {tuple(p.shape)}: {e}") from None
