"""The MuonQ step of one parameter, in three stages: momentum -> orthogonalize -> apply.

* ``momentum_step``: for every batch of same-shape matrices of the parameter's plan (``muonq_hf.matrices``),
  normalize the gradient, update the quantized momentum, split it and store it; returns the Newton-Schulz
  input of every matrix, in the parameter's layout. Row-sharded callers (FSDP2) pass their local rows and
  the cross-rank reductions ``row_sum``/``row_max``.
* ``orthogonalized_update``: Newton-Schulz per matrix and Moonlight's scale 0.2 sqrt(max(rows, cols)) of that
  matrix's own shape; this needs whole matrices (a distributed caller assembles them on one owner rank).
* ``apply_update``: decoupled weight decay and the step, the same elementwise ops on every backend (low-precision
  weights by their group's ``weight_update``: ``muonq_hf.weights``).

The algorithm is the MuonQ step of docs/design.md ("The MuonQ step"); the state it reads and writes is a
``muonq_hf.state.QuantizedMomentum``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .banks import StateBank
from .kernels import fused
from .keyed import device_keys, generator, keyed_normal
from .lowrank import RowSum, no_reduction, power_iteration_factors
from .matrices import MatrixPlan
from .orthogonalize import NS_DTYPES, muon_scale, zeropower_via_newtonschulz5
from .state import QuantizedMomentum, combine
from .weights import ORIGIN, Place, add_rounded, kahan_buffer, rounded_weight


def frobenius(x: torch.Tensor, row_sum: RowSum) -> torch.Tensor:
    """Frobenius norm of each matrix of x (c, rows, cols) -> (c, 1, 1), reduced over row shards."""
    return row_sum(x.square().sum(dim=(-2, -1), keepdim=True)).sqrt()


def _normalized_update(
    G: torch.Tensor,
    M_prev: torch.Tensor,
    low_rank: torch.Tensor | None,
    norm_prev: torch.Tensor | None,
    beta: float,
    normalize: bool,
    nesterov: bool,
    low_dtype: torch.dtype,
    x_dtype: torch.dtype,
    row_sum: RowSum,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The momentum update of a batch (c, L, cols), from the decoded parts of the stored momentum.

    M_prev = (res + P R^T) * norm_prev (``combine``); G_hat = G / ||G||; M = beta M_prev + G_hat;
    M_bar = M / ||M|| (without ``normalize``: G_hat = G, M_bar = M, no norm). Returns the NS input X in
    ``x_dtype`` (NS's dtype: G_hat + beta M_bar with ``nesterov``, else M_bar), M_bar, M_bar in ``low_dtype``
    for the split's M Q (None when that is fp32) and ||M|| (c, 1, 1). Without nesterov and with both dtypes
    bf16 (the defaults), X is that same bf16 M_bar: one tensor, written once, that NS takes as it is.
    """
    M_prev = combine(M_prev, low_rank, norm_prev)
    G_hat = G / (frobenius(G, row_sum) + 1e-7) if normalize else G  # pre-quantization normalization
    M = beta * M_prev + G_hat  # (c, L, cols)
    norm = frobenius(M, row_sum) if normalize else None  # (c, 1, 1)
    M_bar = M / (norm + 1e-7) if normalize else M
    M_low = None if low_dtype == torch.float32 else M_bar.to(low_dtype)
    if not nesterov and M_low is not None and x_dtype == low_dtype:
        return M_low, M_bar, M_low, norm
    X = G_hat + beta * M_bar if nesterov else M_bar
    return X.to(x_dtype), M_bar, M_low, norm


# one process: no reduction inside, one fused loop (decoded residual, P R^T and G in; X, M_bar and its bf16 out)
_normalized_update_fused = fused(_normalized_update)


# ------------------------------------------------------------------------ one batch of matrices
def muonq_momentum(
    G: torch.Tensor,
    momentum: QuantizedMomentum,
    b: int,
    pieces: dict,
    R_init: Callable[[int, int], torch.Tensor],
    rounding_key: tuple[int, ...],
    row_sum: RowSum = no_reduction,
    row_max: RowSum = no_reduction,
) -> torch.Tensor:
    """The MuonQ momentum step of batch b, G (c, L, cols) of same-shape matrices; returns the NS input.

    G may hold only local, zero-padded rows of each matrix (L <= rows). ``pieces`` holds this batch's state
    entries as pieces ((c, L, w) codes, (c,) scales, ...) and is updated in place. ``R_init(cols, r)`` gives
    the first step's Gaussian (c, cols, r); ``rounding_key`` keys the stochastic-rounding noise.
    ``row_sum``/``row_max`` reduce over the ranks that hold row shards of G.
    """
    group = momentum.group
    beta, normalize = group["momentum"], group["normalize"]
    r, cols = momentum.rank(b), G.size(-1)

    res_prev, low_rank, norm_prev, R_prev = momentum.decode_parts(pieces, b)  # (c, L, cols) .. (c, cols, r)
    if res_prev is None:  # first step: zero momentum, seeded Gaussian warm start
        res_prev = torch.zeros_like(G)
        R_prev = R_init(cols, r).to(G.device) if r else None
    elif R_prev is not None:
        # factor columns that collapsed to 0 (a rank-deficient momentum, e.g. a zero first gradient) are re-seeded
        # from the keyed Gaussian, so the split recovers. On CPU only when there are any; on an accelerator that
        # question would be a sync, so the device draw is made every step and selected where a column is dead.
        dead = R_prev.square().sum(dim=-2, keepdim=True) == 0  # (c, 1, r)
        if G.device.type != "cpu" or bool(dead.any()):
            R_prev = torch.where(dead, R_init(cols, r).to(G.device), R_prev)

    update = _normalized_update_fused if row_sum is no_reduction else _normalized_update
    X, M_bar, M_low, norm = update(  # (c, L, cols) x 3, (c, 1, 1)
        G, res_prev, low_rank, norm_prev, beta, normalize, group["nesterov"], momentum.product_dtype,
        ns_dtype(group), row_sum,
    )
    del res_prev, low_rank  # the decoded parts are dead: their memory serves the split
    P = R = None
    if r:
        P, R = power_iteration_factors(M_bar, R_prev, row_sum, momentum.product_dtype, M_low)  # (c,L,r), (c,cols,r)
    momentum.encode(pieces, M_bar, P, R, norm, rounding_key, row_max)  # stores res = M_bar - P R^T
    return X


def momentum_step(
    plan: MatrixPlan,
    G: torch.Tensor,
    state: dict,
    group: dict,
    index: int,
    start: int = 0,
    count: int | None = None,
    experts: tuple[int, int] | None = None,
    row_sum: RowSum = no_reduction,
    row_max: RowSum = no_reduction,
) -> torch.Tensor:
    """MuonQ's momentum step for every matrix of one parameter; returns the NS input, shaped like G, in NS's
    dtype (``ns_dtype``).

    G is the gradient as (E, count, n): the parameter's local experts and local rows [start, start + count).
    ``experts = (first, total)`` places local experts among all of them (FSDP2 shards experts), so the first
    step's Gaussian of each expert is the single-process one. ``index`` is the parameter's position in the
    optimizer (keys its generators).
    """
    step = int(state["step"]) + 1 if "step" in state else 1
    first, total = experts if experts is not None else (0, G.size(0))
    X = _momentum(plan, G, state, group, [index], (first, total), step, start, count, row_sum, row_max)
    state["step"] = torch.tensor(float(step))
    return X


def momentum_steps(bank: StateBank, Gs: list[torch.Tensor], group: dict, indices: list[int]) -> torch.Tensor:
    """``momentum_step`` of the k whole parameters of a shape group at once, their state held by ``bank``; returns
    their NS inputs stacked, (k E, m, n).

    Every operation of the step acts on each matrix alone, so the k parameters' matrices go through each
    kernel together (one launch instead of k on a GPU) and get the values of k single steps. Each keeps its
    own state entries (views of the bank), step count and first-step Gaussian (keyed by its index). Stochastic
    rounding keys its noise per parameter: a group of more than one is refused.
    """
    k = len(Gs)
    if k > 1 and group["stochastic_rounding"]:
        raise ValueError("momentum_steps: stochastic_rounding draws its noise per parameter; step them one by one")
    state = bank.entries  # the state of one stacked parameter of k E matrices
    steps = state.get("step")
    step = int(steps[0]) + 1 if steps is not None and k == 1 else 1  # the stochastic-rounding key (k == 1 only)
    G = Gs[0] if k == 1 else torch.cat(Gs)  # (k E, m, n)
    fresh = set(state)
    X = _momentum(bank.plan, G, state, group, indices, (0, Gs[0].size(0)), step, in_place=True)
    if steps is None:
        state["step"] = torch.ones(k)
    else:
        steps.add_(1)
    if state.keys() != fresh:  # the first step made the entries: the members' entries become their views
        bank.publish()
    return X


def _momentum(
    plan: MatrixPlan,
    G: torch.Tensor,
    state: dict,
    group: dict,
    indices: list[int],
    experts: tuple[int, int],
    step: int,
    start: int = 0,
    count: int | None = None,
    row_sum: RowSum = no_reduction,
    row_max: RowSum = no_reduction,
    in_place: bool = False,
) -> torch.Tensor:
    """The momentum step of G (K, count, n), the matrices of one parameter (or of a bank: ``indices`` holds one
    index per member, each with K / len(indices) of the matrices), its state in ``state``."""
    first, total = experts
    E = G.size(0) // len(indices)  # local experts of each member
    momentum = QuantizedMomentum(plan, group)
    # one piece: the batch's result is X itself; else the batches' NS inputs go into X, in NS's dtype
    X = None if plan.whole else torch.empty(G.shape, dtype=ns_dtype(group), device=G.device)
    for b, pieces_b in enumerate(plan.batches):
        keys = [(index,) if b == 0 else (index, b) for index in indices]
        c = len(pieces_b)

        def R_init(cols: int, r: int, keys: list[tuple[int, ...]] = keys, c: int = c) -> torch.Tensor:
            """The keyed Gaussian (K c, cols, r) of these matrices: each member's (E_local c, cols, r) part of its
            own (total c, cols, r) draw. On CPU from the keyed generator; elsewhere drawn on the device
            (``keyed.keyed_normal``: no host-to-device copy)."""
            if G.device.type != "cpu":
                draws = keyed_normal((total * c, cols, r), device_keys(group["seed"], tuple(keys), G.device))
                return draws[:, first * c : (first + E) * c].flatten(0, 1)  # (members, total c, ...) -> (K c, ...)
            draws = [
                torch.randn((total * c, cols, r), generator=generator(group["seed"], *key), dtype=torch.float32)[
                    first * c : (first + E) * c
                ]
                for key in keys
            ]  # each (E_local * c, cols, r)
            return draws[0] if len(draws) == 1 else torch.cat(draws)

        pieces = momentum.load(state, b, start, count)
        G_b = plan.take(G, b, start, count)  # (K c, L, cols)
        X_b = muonq_momentum(G_b, momentum, b, pieces, R_init, (*keys[0], step), row_sum, row_max)
        momentum.store(state, b, pieces, start, count, in_place=in_place)
        if X is None:
            X = X_b
        else:
            plan.put(X, b, X_b, start, count)
    return X


# ------------------------------------------------------------------------- orthogonalize, apply
def ns_dtype(group: dict) -> torch.dtype:
    return NS_DTYPES[group["ns_dtype"]]


def orthogonalized_update(plan: MatrixPlan, X: torch.Tensor, group: dict) -> torch.Tensor:
    """NS5 of every matrix of X (E, m, n), each times 0.2 sqrt(max(rows, cols)) of its own shape, in
    ``ns_dtype`` (bf16 by default: the scale is folded into NS's last matmul, so no fp32 copy of the update is
    made; a distributed backend moves it in that dtype)."""
    steps, dtype, coefficients = group["ns_steps"], ns_dtype(group), group["ns_coefficients"]
    if plan.whole:  # one piece: no assembling (E, m, n) from batches
        return zeropower_via_newtonschulz5(X, steps, dtype, muon_scale(plan.m, plan.n), coefficients)  # (E, m, n)
    out = torch.empty(X.shape, dtype=dtype, device=X.device)
    for b in range(len(plan.batches)):
        U = zeropower_via_newtonschulz5(plan.take(X, b), steps, dtype, muon_scale(*plan.batch_shape(b)), coefficients)
        plan.put(out, b, U)  # (E*c, r, c) pieces into (E, m, n)
    return out


def apply_update(
    weight: torch.Tensor, update: torch.Tensor, lr: float, weight_decay: float, rounding: Rounding | None = None
) -> None:
    """W *= 1 - lr * wd; W -= lr * update (update already scaled per matrix): ``apply_updates`` of one weight."""
    apply_updates([weight], update, lr, weight_decay, rounding)


@dataclass(frozen=True)
class Rounding:
    """How k low-precision weights take their change (``muonq_hf.weights``): their group (``weight_update``,
    ``seed``), Kahan buffers, noise keys (parameter index, step) and places in their parameters."""

    group: dict
    buffers: list[torch.Tensor | None]
    keys: list[tuple[int, int]]
    places: list[Place]


def rounding_for(
    weights: list[torch.Tensor], group: dict, states: list[dict], indices: list[int], places: list[Place] | None = None
) -> Rounding | None:
    """The ``Rounding`` of k weights of one group after their momentum step (which counted it), or None where they
    take torch's add (fp32 weights, ``weight_update="nearest"``). ``states`` hold their Kahan buffers."""
    if not rounded_weight(weights[0], group):
        return None
    kahan = group["weight_update"] == "kahan"
    return Rounding(
        group,
        [kahan_buffer(state, w) if kahan else None for state, w in zip(states, weights, strict=True)],
        [(index, int(state["step"])) for index, state in zip(indices, states, strict=True)],
        places or [ORIGIN] * len(weights),
    )


def apply_updates(
    weights: list[torch.Tensor],
    update: torch.Tensor,
    lr: float | torch.Tensor,
    weight_decay: float,
    rounding: Rounding | None = None,
) -> None:
    """W *= 1 - lr * wd; W -= lr * U for k weights of one dtype, from their updates stacked on dim 0 (each already
    scaled per matrix): one foreach op per operation (one launch on a GPU), the same ops on every backend.

    With wd = 0 (the HF Trainer's default) the multiply by 1, a pass over the weights that changes no bit, is
    skipped. An fp32 weight adds a bf16 update as is (promoted exactly inside the add, no fp32 copy), except for
    several weights off the CPU: there the update is first cast to fp32, once for all (a foreach add of mixed
    dtypes falls back to one launch per tensor on CUDA). bf16/fp16 weights take it in their own dtype, rounded to
    nearest, or with ``rounding`` the whole change in fp32, added stochastically or compensated (``weights``).
    """
    if rounding is not None:
        parts = update.chunk(len(weights)) if len(weights) > 1 else (update,)
        deltas = [u.reshape(w.shape).float() * -lr for u, w in zip(parts, weights, strict=True)]  # fp32 temporaries
        if weight_decay != 0:
            torch._foreach_add_(deltas, [w.float() * (-lr * weight_decay) for w in weights])
        add_rounded(weights, deltas, rounding.group, rounding.buffers, rounding.keys, rounding.places)
        return
    if weight_decay != 0:
        torch._foreach_mul_(weights, 1 - lr * weight_decay)
    dtype, alpha = weights[0].dtype, -lr
    if torch.is_tensor(lr):  # a device scalar (a recorded step, ``muonq_hf.graphs``): scale the update by it first
        update, alpha = update.to(dtype) * -lr, 1
    elif dtype != torch.float32 or (len(weights) > 1 and update.device.type != "cpu"):
        update = update.to(dtype)
    parts = update.chunk(len(weights)) if len(weights) > 1 else (update,)
    torch._foreach_add_(weights, [u.reshape(w.shape) for u, w in zip(parts, weights, strict=True)], alpha=alpha)
