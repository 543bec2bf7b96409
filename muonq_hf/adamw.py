"""The AdamW step of MuonQ's AdamW groups: torch's AdamW, with fp32 or blockwise 8-bit moments.

One function for every backend: a single process and the DDP row owners pass the parameter (or a row slice
of it), FSDP2 its local shard, DeepSpeed its flat fp32 partition; ``quantized`` is decided from the whole
parameter's shape (``muonq_hf.state.adamw_quantized``), so every backend stores the same kind of moments.

The step runs in chunks of rows (``CHUNK_ELEMENTS``): 8-bit moments are decoded, updated and encoded again
chunk by chunk (the codec's blocks run along rows, so a chunk's codes are exactly those of the whole tensor),
fp32 moments are updated through row views. The step's extra memory is a few fp32 copies of one chunk instead
of the whole tensor (a 525M-element embedding + head would otherwise decode into 4 GB of fp32 temporaries).
An 8-bit chunk is one fused call (``_quantized_update``): compiled, decode, update and encode are one or two
kernels and the decoded moments never leave them.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .codecs import DynamicCodebook, dequantize_dynamic8, quantize_dynamic8
from .kernels import fused
from .state import ADAMW_8BIT_BLOCK, ADAMW_MOMENTS, moment_codebook
from .weights import ORIGIN, Place, add_rounded, kahan_buffer, rounded_weight

CHUNK_ELEMENTS = 1 << 20  # rows are processed in chunks of about this many elements (4 MiB in fp32)
# A recorded step (``muonq_hf.graphs``) gives its groups the step count as a device scalar under this key (and the lr
# as one): the bias corrections are then computed on the device, so a replay takes the count of its own step.
DEVICE_STEP = "device_step"


def adamw_step(
    weight: torch.Tensor, grad: torch.Tensor, state: dict, group: dict, quantized: bool, index: int = 0,
    place: Place = ORIGIN,
) -> None:
    """One AdamW step of ``weight`` (any shape, viewed as (rows, rest)), its state updated in place, chunk by chunk.
    ``index`` (the parameter's position) and ``place`` (the block's place in it) key a low-precision weight's
    stochastic rounding (``muonq_hf.weights``)."""
    if not (weight.is_contiguous() and grad.is_contiguous()):  # no row view of it: step a contiguous copy
        contiguous = weight.contiguous()
        adamw_step(contiguous, grad.contiguous(), state, group, quantized, index, place)
        weight.copy_(contiguous)
        return
    rows, cols = (weight.shape[0], math.prod(weight.shape[1:])) if weight.ndim else (1, 1)  # a shard may have 0 rows
    step = _count_step(state, grad, quantized, rows, cols)
    W, G = weight.view(rows, cols), grad.view(rows, cols)  # (rows, cols)
    books = [moment_codebook(k, grad.device) for k in ADAMW_MOMENTS] if quantized else []
    hyper = _hyperparameters(group, step)
    keys = [f"{k}_{part}" for k in ADAMW_MOMENTS for part in ("codes", "absmax")]  # the 8-bit entries, in order
    tables = [t for book in books for t in (book.values, book.start, book.threshold)]
    rounded = rounded_weight(weight, group)  # a low-precision weight that takes its change by weight_update
    if rounded and group["weight_update"] == "kahan":
        buffer = kahan_buffer(state, weight).view(rows, cols)
    per_chunk = max(1, CHUNK_ELEMENTS // max(1, cols))  # rows
    for start in range(0, rows, per_chunk):
        chunk = slice(start, start + per_chunk)
        if quantized:  # one fused call: decode, update, encode (compiled: one or two kernels instead of ~35 ops)
            *encoded, delta = _quantized_update(W[chunk], G[chunk], *(state[k][chunk] for k in keys), *tables, *hyper,
                                                rounded=rounded)
            for key, value in zip(keys, encoded, strict=True):
                state[key][chunk] = value
            deltas = [delta]
        else:  # views of the fp32 moments: updated in place
            exp_avg, exp_avg_sq = (state[k].view(rows, cols)[chunk] for k in ADAMW_MOMENTS)
            deltas = _update([W[chunk]], [G[chunk].float()], [exp_avg], [exp_avg_sq], *hyper, rounded=rounded)
        if rounded:  # the chunk's change in fp32, added stochastically or compensated
            buffers = [buffer[chunk]] if group["weight_update"] == "kahan" else [None]
            chunk_place = Place(place.row + start, place.col, place.width)
            add_rounded([W[chunk]], deltas, group, buffers, [(index, int(step))], [chunk_place])


def adamw_steps(weights: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict], group: dict) -> None:
    """``adamw_step`` of several fp32 tensors of one group with fp32 moments and the same step count at once:
    ``_update`` runs each ``torch._foreach`` op once for all of them (one kernel on a GPU; the per-tensor ops,
    in the same order: the values of one-by-one steps). For tensors that need no chunks (``CHUNK_ELEMENTS``)."""
    for grad, state in zip(grads, states, strict=True):
        if not state:
            _start(state, grad, False, 1, 1)
    counts = [state["step"] for state in states]
    torch._foreach_add_(counts, 1.0)  # one op for every count (torch's foreach AdamW counts the same way)
    moments = ([state[k] for state in states] for k in ADAMW_MOMENTS)
    _update(weights, grads, *moments, *_hyperparameters(group, counts[0].item()))


def _count_step(state: dict, grad: torch.Tensor, quantized: bool, rows: int, cols: int) -> float:
    """Start the state (zero moments: fp32 like ``grad``, or 8-bit codes of (rows, cols)) before the first step,
    count this step and return its number (a CPU scalar: no device sync)."""
    if not state:
        _start(state, grad, quantized, rows, cols)
    state["step"] += 1
    return state["step"].item()


def _start(state: dict, grad: torch.Tensor, quantized: bool, rows: int, cols: int) -> None:
    """The state before the first step: count 0 (a CPU scalar) and zero moments."""
    state["step"] = torch.tensor(0.0)
    for k in ADAMW_MOMENTS:
        if quantized:
            state[f"{k}_codes"], state[f"{k}_absmax"] = zero_moment(k, rows, cols, grad.device)
        else:
            state[k] = torch.zeros_like(grad, dtype=torch.float32)


def zero_moment(key: str, rows: int, cols: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8-bit codes and block absmax of an all-zero moment, as ``quantize_dynamic8`` of zeros gives them
    (absmax clamped to 1e-12, every code the map's zero), filled directly: quantizing a zero embedding of 500M
    elements would take gigabytes of temporaries at the first step."""
    zero = torch.zeros(1, 1, device=device)
    code, absmax = quantize_dynamic8(zero, moment_codebook(key, device), ADAMW_8BIT_BLOCK)  # (1, 1) each
    blocks = -(-cols // ADAMW_8BIT_BLOCK)
    return code.expand(rows, cols).contiguous(), absmax.expand(rows, blocks).contiguous()


def _hyperparameters(group: dict, step: float) -> tuple[Any, ...]:
    """``_update``'s scalars for step number ``step``: beta1, beta2, eps, whether there is weight decay, the decay
    factor 1 - lr wd, the step size lr / (1 - beta1^step) and sqrt(1 - beta2^step).

    Plain numbers, computed here and not in ``_update``: a compiled caller takes floats as symbolic inputs, so a
    scheduler's new lr or the next step count compiles nothing again (a power with the step count as exponent
    would be specialized). In a recorded step (``DEVICE_STEP`` in the group) lr and the count are device scalars
    and so are the last three: computed by the recorded kernels from the values filled in before each replay."""
    beta1, beta2 = (float(b) for b in group["betas"])
    weight_decay = float(group["weight_decay"])
    if DEVICE_STEP in group:
        lr, step, root = group["lr"], group[DEVICE_STEP], torch.sqrt
    else:
        lr, root = float(group["lr"]), math.sqrt
    bias1, bias2 = 1 - beta1**step, 1 - beta2**step
    return beta1, beta2, float(group["eps"]), weight_decay != 0, 1 - lr * weight_decay, lr / bias1, root(bias2)


def _update(
    weights: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    beta1: float,
    beta2: float,
    eps: float,
    decays: bool,
    decay: float | torch.Tensor,
    step_size: float | torch.Tensor,
    bias2_root: float | torch.Tensor,
    rounded: bool = False,
) -> list[torch.Tensor] | None:
    """torch's AdamW on tensors of one group and step count (or chunks of rows), with the scalars of
    ``_hyperparameters``: moments in place, then the weights. ``torch._foreach`` ops: one tensor or many, each op
    is one kernel on a GPU. ``rounded``: the weights are left as they are and their fp32 changes returned
    (low-precision weights that take them by ``weight_update``, ``muonq_hf.weights``)."""
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)  # one temporary per tensor, then in place
    torch._foreach_div_(denom, bias2_root)
    torch._foreach_add_(denom, eps)
    on_device = torch.is_tensor(step_size)  # a device scalar (a recorded step): folded into the denominators
    if on_device:
        torch._foreach_div_(denom, -step_size)
    if rounded:  # the change in fp32: -step_size m / denom, and the decay's w (decay - 1)
        deltas = torch._foreach_div(exp_avgs, denom)
        if not on_device:
            torch._foreach_mul_(deltas, -step_size)
        if decays:
            torch._foreach_add_(deltas, [w.float() * (decay - 1) for w in weights])
        return deltas
    if decays:  # decoupled weight decay; the HF Trainer's default weight_decay is 0
        torch._foreach_mul_(weights, decay)
    if not on_device and all(w.dtype == torch.float32 for w in weights):
        torch._foreach_addcdiv_(weights, exp_avgs, denom, value=-step_size)
    else:  # the ratio in fp32 (eps = 1e-8 is 0 in fp16, and 0 / 0 turned fp16 weights NaN), then added
        ratios = torch._foreach_div(exp_avgs, denom)
        torch._foreach_add_(weights, [r.to(w.dtype) for r, w in zip(ratios, weights, strict=True)],
                            alpha=1 if on_device else -step_size)
    return None


@fused
def _quantized_update(
    weight: torch.Tensor,
    grad: torch.Tensor,
    m_codes: torch.Tensor,
    m_absmax: torch.Tensor,
    v_codes: torch.Tensor,
    v_absmax: torch.Tensor,
    m_values: torch.Tensor,
    m_start: torch.Tensor,
    m_threshold: torch.Tensor,
    v_values: torch.Tensor,
    v_start: torch.Tensor,
    v_threshold: torch.Tensor,
    *hyper: Any,
    rounded: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """AdamW on rows (rows, cols) of a weight with 8-bit moments: decode m and v (codes, block absmax and the
    ``DynamicCodebook`` tables of each), update them and the weight (in place), and return their new codes and
    absmax (and, ``rounded``, the weight's fp32 change instead of applying it). One fused function, so that
    compiled the decoded fp32 moments never leave the kernel.

    The update is ``_update``'s, written with tensor ops: compiled, a foreach op would specialize its float
    scalars (a new graph at every step count); tensor ops take them as inputs. Same operations, same order."""
    beta1, beta2, eps, decays, decay, step_size, bias2_root = hyper
    books = DynamicCodebook(m_values, m_start, m_threshold), DynamicCodebook(v_values, v_start, v_threshold)
    g = grad.float()  # (rows, cols)
    m = dequantize_dynamic8(m_codes, m_absmax, books[0]).lerp(g, 1 - beta1)
    v = dequantize_dynamic8(v_codes, v_absmax, books[1]) * beta2 + (1 - beta2) * g * g
    denom = v.sqrt() / bias2_root + eps
    delta = None
    if rounded:  # a low-precision weight that takes its change by weight_update: returned in fp32, not applied
        delta = m / denom * -step_size + (weight.float() * (decay - 1) if decays else 0)
    else:
        if decays:
            weight.mul_(decay)
        weight.add_((m / denom * -step_size).to(weight.dtype))  # a scalar times a tensor: no specialized scalar
    (m_codes, m_absmax), (v_codes, v_absmax) = (
        quantize_dynamic8(value, book, ADAMW_8BIT_BLOCK) for value, book in zip((m, v), books, strict=True)
    )
    return m_codes, m_absmax, v_codes, v_absmax, delta
