"""The MuonQ step of one parameter, in three stages: momentum -> orthogonalize -> apply.

* ``momentum_step``: for every batch of same-shape matrices of the parameter's plan (``muonq_hf.matrices``),
  normalize the gradient, update the quantized momentum, split it and store it; returns the Newton-Schulz
  input of every matrix, in the parameter's layout. Row-sharded callers (FSDP2) pass their local rows and
  the cross-rank reductions ``row_sum``/``row_max``.
* ``orthogonalized_update``: Newton-Schulz per matrix and Moonlight's scale 0.2 sqrt(max(rows, cols)) of that
  matrix's own shape; this needs whole matrices (a distributed caller assembles them on one owner rank).
* ``apply_update``: decoupled weight decay and the step, the same elementwise ops on every backend.

The algorithm is the MuonQ step of docs/design.md ("The MuonQ step"); the state layout is
``muonq_hf.matrices``'s.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .codecs import dequantize, packed_width, quantize
from .lowrank import RowSum, power_iteration_split, rank_for
from .matrices import MatrixPlan, base_key, batch_key, is_row_key
from .orthogonalize import muon_scale, zeropower_via_newtonschulz5

ZERO_CODE = {4: 0x88, 8: 0}  # the byte of two 4-bit zero codes / one 8-bit zero code


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def generator(seed: int, *key: int) -> torch.Generator:
    """A CPU generator keyed by (seed, *key): identical on every rank and after a resume."""
    g = torch.Generator(device="cpu")
    g.manual_seed(hash((seed, *key)) & 0x7FFF_FFFF_FFFF_FFFF)
    return g


def frobenius(x: torch.Tensor, row_sum: RowSum) -> torch.Tensor:
    """Frobenius norm of each matrix of x (c, rows, cols) -> (c, 1, 1), reduced over row shards."""
    return row_sum(x.square().sum(dim=(-2, -1), keepdim=True)).sqrt()


def _granularity(group: dict) -> str:
    return "matrix" if group["block_size"] is None else "block"


def scale_dtype(group: dict) -> torch.dtype:
    """fp16 scales hold normalized momenta (|values| <= 1); without normalization the momentum is unbounded
    (gradients of ~3e4 overflowed fp16's 65504 into NaN weights), so its scales are fp32 (2 more bytes each)."""
    return torch.float16 if group["normalize"] else torch.float32


# ------------------------------------------------------------------------ one batch of matrices
def muonq_momentum(
    G: torch.Tensor,
    shape: tuple[int, int],
    state: dict,
    group: dict,
    R_init: Callable[[int, int], torch.Tensor],
    rounding_key: tuple[int, ...],
    row_sum: RowSum = _identity,
    row_max: RowSum = _identity,
) -> torch.Tensor:
    """The MuonQ momentum step of a batch G (c, L, cols) of same-shape matrices; returns the NS input.

    ``shape`` is the (rows, cols) of each whole matrix (G may hold only local, zero-padded rows: L <= rows).
    ``state`` holds this batch's entries as pieces ((c, rows, w) codes, (c,) scales, ...) and is updated in
    place. ``R_init(cols, r)`` gives the first step's Gaussian (c, cols, r); ``rounding_key`` keys the
    stochastic-rounding noise. ``row_sum``/``row_max`` reduce over the ranks that hold row shards of G.
    """
    beta = group["momentum"]
    r = rank_for(*shape, group["rank_divisor"])
    cols = shape[1]

    M_prev, R_prev = _load_momentum(state, group, r, cols)  # (c, rows, cols), (c, cols, r)
    if M_prev is None:  # first step: zero momentum, seeded Gaussian warm start
        M_prev = torch.zeros_like(G)
        R_prev = R_init(cols, r).to(G.device) if r else None
    elif R_prev is not None:
        dead = R_prev.square().sum(dim=-2, keepdim=True) == 0  # (c, 1, r): factor columns that collapsed to 0
        if bool(dead.any()):  # (a rank-deficient momentum, e.g. a zero first gradient): re-seed them from the
            R_prev = torch.where(dead, R_init(cols, r).to(G.device), R_prev)  # keyed Gaussian, so the split recovers

    G_hat = G / (frobenius(G, row_sum) + 1e-7) if group["normalize"] else G  # pre-quantization normalization
    M = beta * M_prev + G_hat  # (c, rows, cols)
    if group["normalize"]:
        norm = frobenius(M, row_sum)  # (c, 1, 1)
        M_bar = M / (norm + 1e-7)
    else:
        norm, M_bar = None, M

    if r:
        P, R, res = power_iteration_split(M_bar, R_prev, row_sum)  # (c, rows, r), (c, cols, r), (c, rows, cols)
    else:
        P = R = None
        res = M_bar
    store_momentum(state, group, res, P, R, norm, rounding_key, row_max)
    return G_hat + beta * M_bar if group["nesterov"] else M_bar


def _load_momentum(state: dict, group: dict, r: int, cols: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Dequantized previous momentum (c, rows, cols) and right factor (c, cols, r); (None, None) before step 1."""
    if not any(k in state for k in ("res", "res_codes")):
        return None, None
    bits, mu = group["bits"], float(group["mu"])
    if bits == 32:
        M = state["res"].clone()
        R = state.get("R")
        if R is not None:
            M = M + state["P"] @ R.mT
    else:
        scale = state["res_scale"]
        scale = scale.view(-1, 1, 1) if scale.ndim == 1 else scale
        M = dequantize(state["res_codes"], scale, cols, bits, mu, _granularity(group), group["block_size"])
        R = None
        if "R_codes" in state:
            P = dequantize(state["P_codes"], state["P_scale"].unsqueeze(-2), r, bits, mu, "column")
            R = dequantize(state["R_codes"], state["R_scale"].unsqueeze(-2), r, bits, mu, "column")
            M = M + P @ R.mT
    if "norm" in state:
        M = M * state["norm"].view(-1, 1, 1)
    return M, R


def store_momentum(
    state: dict,
    group: dict,
    res: torch.Tensor,
    P: torch.Tensor | None,
    R: torch.Tensor | None,
    norm: torch.Tensor | None,
    rounding_key: tuple[int, ...],
    row_max: RowSum,
) -> None:
    """Write a batch's packed state as pieces."""
    bits, mu = group["bits"], float(group["mu"])
    if group["store_norm"] and norm is not None:
        state["norm"] = norm.flatten().float()  # (c,)
    if bits == 32:
        state["res"] = res.contiguous()
        if P is not None:
            state["P"], state["R"] = P.contiguous(), R.contiguous()
        return

    def rounding(kind: int) -> dict:
        if not group["stochastic_rounding"]:
            return {}
        return {"stochastic": True, "generator": generator(group["seed"], *rounding_key, kind)}

    granularity = _granularity(group)
    dtype = scale_dtype(group)
    codes, scale = quantize(
        res, bits, mu, granularity, group["block_size"], group_max=row_max, scale_dtype=dtype, **rounding(0)
    )  # (c, rows, w), (c, 1, 1) or (c, rows, nb)
    state["res_codes"] = codes
    state["res_scale"] = scale.flatten() if granularity == "matrix" else scale
    if P is not None:
        P_codes, P_scale = quantize(P, bits, mu, "column", group_max=row_max, scale_dtype=dtype, **rounding(1))
        R_codes, R_scale = quantize(R, bits, mu, "column", scale_dtype=dtype, **rounding(2))  # (c, cols, w), (c, 1, r)
        state["P_codes"], state["P_scale"] = P_codes, P_scale.squeeze(-2)
        state["R_codes"], state["R_scale"] = R_codes, R_scale.squeeze(-2)


# ---------------------------------------------------------------- the state of a whole parameter
def _piece_width(key: str, rows: int, cols: int, group: dict) -> int:
    """Width of one piece's part of the row entry ``key``."""
    bits, r = group["bits"], rank_for(rows, cols, group["rank_divisor"])
    if key in ("res_codes", "P_codes"):
        return packed_width(cols if key == "res_codes" else r, bits)
    if key == "res_scale":  # blockwise scales: one per block of each row
        return -(-cols // group["block_size"])
    return cols if key == "res" else r  # fp32 residual / P


def row_widths(plan: MatrixPlan, group: dict, key: str) -> list[int]:
    return [_piece_width(key, *plan.piece_shape(j), group) for j in range(plan.k)]


def _fill(key: str, group: dict) -> float:
    return float(ZERO_CODE[group["bits"]]) if key.endswith("_codes") else 0.0


def _lead(t: torch.Tensor, plan: MatrixPlan) -> torch.Tensor:
    """A stored entry with the expert dim in front: plain plans keep no expert dim in their state."""
    return t if plan.stacked else t.unsqueeze(0)


def load_batch(
    state: dict, plan: MatrixPlan, group: dict, b: int, start: int = 0, count: int | None = None
) -> dict[str, torch.Tensor]:
    """Batch b's state as pieces (E * c, ...) from a parameter's state (local rows [start, start + count))."""
    prefix = "" if b == 0 else f"b{b}."
    out: dict[str, torch.Tensor] = {}
    if "step" not in state:  # before the first step (row entries may already hold an earlier batch's pieces)
        return out
    for key, value in state.items():
        if key == "step" or not torch.is_tensor(value):
            continue
        if is_row_key(key, group["block_size"]):
            out[key] = plan.take_rows(
                _lead(value, plan), b, row_widths(plan, group, key), _fill(key, group), start, count
            )
        elif (key.startswith(prefix) and "." not in key[len(prefix) :]) if prefix else "." not in key:
            out[base_key(key)] = _lead(value, plan).flatten(0, 1)  # (E, c, ...) -> (E * c, ...)
    return out


def store_batch(
    state: dict, plan: MatrixPlan, group: dict, b: int, pieces: dict, start: int = 0, count: int | None = None
) -> None:
    """Write batch b's pieces back into the parameter's state (row entries are created on first use)."""
    for key, value in pieces.items():
        if is_row_key(key, group["block_size"]):
            widths = row_widths(plan, group, key)
            if key not in state:
                rows = (plan.m if count is None else count, plan.row_width(widths))  # local rows, W
                experts = value.size(0) // len(plan.batches[b])
                state[key] = value.new_full((experts, *rows) if plan.stacked else rows, _fill(key, group))
            plan.put_rows(_lead(state[key], plan), b, widths, value, start, count)
        else:
            stored = value.unflatten(0, (-1, len(plan.batches[b])))  # (E, c, ...)
            state[batch_key(key, b)] = stored.contiguous() if plan.stacked else stored[0].contiguous()


def momentum_step(
    plan: MatrixPlan,
    G: torch.Tensor,
    state: dict,
    group: dict,
    index: int,
    start: int = 0,
    count: int | None = None,
    experts: tuple[int, int] | None = None,
    row_sum: RowSum = _identity,
    row_max: RowSum = _identity,
) -> torch.Tensor:
    """MuonQ's momentum step for every matrix of one parameter; returns the NS input, shaped like G.

    G is the gradient as (E, count, n): the parameter's local experts and local rows [start, start + count).
    ``experts = (first, total)`` places local experts among all of them (FSDP2 shards experts), so the first
    step's Gaussian of each expert is the single-process one. ``index`` is the parameter's position in the
    optimizer (keys its generators).
    """
    step = int(state["step"]) + 1 if "step" in state else 1
    first, total = experts if experts is not None else (0, G.size(0))
    X = torch.empty_like(G)
    for b, pieces_b in enumerate(plan.batches):
        key = (index,) if b == 0 else (index, b)
        c = len(pieces_b)

        def R_init(cols: int, r: int, key: tuple[int, ...] = key, c: int = c) -> torch.Tensor:
            draw = torch.randn((total * c, cols, r), generator=generator(group["seed"], *key), dtype=torch.float32)
            return draw[first * c : (first + G.size(0)) * c]  # (E_local * c, cols, r)

        pieces = load_batch(state, plan, group, b, start, count)
        X_b = muonq_momentum(
            plan.take(G, b, start, count), plan.batch_shape(b), pieces, group, R_init, (*key, step), row_sum, row_max
        )  # (E * c, L, cols)
        store_batch(state, plan, group, b, pieces, start, count)
        plan.put(X, b, X_b, start, count)
    state["step"] = torch.tensor(float(step))
    return X


def dequantized_momentum(plan: MatrixPlan, state: dict, group: dict) -> torch.Tensor | None:
    """The stored momentum of a whole (unsharded) parameter as (E, m, n) fp32; None before the first step."""
    if "step" not in state:
        return None
    out = None
    for b in range(len(plan.batches)):
        pieces = load_batch(state, plan, group, b)
        rows, cols = plan.batch_shape(b)
        M, _ = _load_momentum(pieces, group, rank_for(rows, cols, group["rank_divisor"]), cols)
        if out is None:
            out = M.new_zeros(M.size(0) // len(plan.batches[b]), plan.m, plan.n)
        plan.put(out, b, M)
    return out


# ------------------------------------------------------------------------- orthogonalize, apply
def orthogonalized_update(plan: MatrixPlan, X: torch.Tensor, ns_steps: int) -> torch.Tensor:
    """NS5 of every matrix of X (E, m, n), each times 0.2 sqrt(max(rows, cols)) of its own shape; fp32."""
    out = torch.empty(X.shape, dtype=torch.float32, device=X.device)
    for b in range(len(plan.batches)):
        U = zeropower_via_newtonschulz5(plan.take(X, b), ns_steps).float()  # (E * c, rows, cols)
        plan.put(out, b, U.mul_(muon_scale(*plan.batch_shape(b))))
    return out


def apply_update(weight: torch.Tensor, update: torch.Tensor, lr: float, weight_decay: float) -> None:
    """W *= 1 - lr * wd; W -= lr * update (update already scaled per matrix). The same ops on every backend."""
    weight.mul_(1 - lr * weight_decay)
    weight.add_(update.reshape(weight.shape).to(weight.dtype), alpha=-lr)
