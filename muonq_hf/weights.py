"""Low-precision weights that keep their updates: stochastic rounding or Kahan-compensated adds (docs/design.md,
"Low-precision weights").

A bf16 weight holds 8 significant bits: ``w + d`` rounded to nearest drops every change ``d`` below half an
ulp of ``w`` (2^-9 |w|). Muon's entries are about ``0.2 lr`` each, so at a fine-tuning lr most of them vanish
from a model kept in bf16 without an fp32 master copy (benchmarks/RESULTS.md, "Low-precision weights"). The
group option ``weight_update`` chooses how a bf16 / fp16 weight takes its change ``d`` (computed in fp32,
decoupled weight decay included):

* ``"nearest"`` (default): ``w + d`` rounded to nearest, what every optimizer does.
* ``"stochastic"``: ``w + d`` rounded down or up with the probabilities that make it unbiased (E[w'] = w + d).
  The uniform draws come from a counter hash (``keyed``) under the key (seed, parameter index, step) and the
  element's position in the whole parameter: every rank draws the same number for the same element, whatever
  its shard, and a resume draws what the uninterrupted run would have.
* ``"kahan"``: a compensation buffer ``c`` (the weight's dtype and shape, state entry ``weight_kahan``) carries
  what rounding dropped: ``u = d + c; w' = round(w + u); c = u - (w' - w)``. Deterministic; 2 bytes per bf16
  element, counted in ``state_bytes`` and checkpointed.

fp32 weights take their change as before, whatever the option.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernels import fused
from .keyed import MASK32, _hash32, key_of

WEIGHT_UPDATES = ("nearest", "stochastic", "kahan")
LOW_PRECISION = (torch.bfloat16, torch.float16)
KAHAN = "weight_kahan"  # the state entry of a Kahan-compensated weight
MAX_KEYED_ELEMENTS = 2**32  # the noise counter of an element is its index in the parameter, < 2^32
NOISE_KIND = 4  # the last element of the noise key (stochastic rounding of the momentum codes uses 0, 1, 2)


def rounded_weight(weight: torch.Tensor, group: dict) -> bool:
    """Whether ``weight`` takes its change by ``group["weight_update"]`` (a bf16 / fp16 weight, a mode other than
    nearest) instead of torch's add."""
    return group["weight_update"] != "nearest" and weight.dtype in LOW_PRECISION


@dataclass(frozen=True)
class Place:
    """Where a weight's block, viewed as (rows, cols), sits in its whole parameter viewed as (m, width): its first
    row and column. Element (i, j) of the block draws the noise of counter (row + i) * width + col + j."""

    row: int = 0
    col: int = 0
    width: int | None = None  # None: the block's own cols (it spans the parameter's columns)


ORIGIN = Place()  # a whole parameter, or its first rows


def kahan_buffer(state: dict, weight: torch.Tensor) -> torch.Tensor:
    """The Kahan compensation of ``weight`` in ``state``: zero at the first use, in the weight's dtype and shape."""
    buffer = state.get(KAHAN)
    if buffer is None or buffer.shape != weight.shape or buffer.dtype != weight.dtype:
        if buffer is not None:  # a checkpoint of another dtype: keep its values, in this dtype
            buffer = buffer.to(weight.dtype).reshape(weight.shape) if buffer.numel() == weight.numel() else None
        state[KAHAN] = buffer if buffer is not None else torch.zeros_like(weight)
    return state[KAHAN]


def add_rounded(
    weights: list[torch.Tensor],
    deltas: list[torch.Tensor],
    group: dict,
    buffers: list[torch.Tensor | None],
    keys: list[tuple[int, int]],
    places: list[Place],
) -> None:
    """``w += d`` for low-precision weights by ``group["weight_update"]``: ``deltas`` are fp32, shaped like their
    weights; ``buffers`` are the Kahan compensations (``kahan_buffer``, "kahan"), ``keys`` the (parameter index,
    step) and ``places`` the blocks' places in their parameters that key the noise ("stochastic")."""
    if group["weight_update"] == "kahan":
        _kahan_add(weights, deltas, buffers)
        return
    for weight, delta, key, place in zip(weights, deltas, keys, places, strict=True):
        if weight.numel() == 0:  # a shard without rows
            continue
        rows = weight.shape[0] if weight.ndim else 1
        view = weight.view(rows, -1)  # (rows, cols)
        cols = view.shape[1]
        width = cols if place.width is None else place.width  # (the step refused parameters past 2^32 elements)
        full = key_of(group["seed"], *key, NOISE_KIND)
        view.copy_(_stochastic_add(view, delta.view(view.shape), place.row, place.col, width,
                                   full & MASK32, (full >> 32) & MASK32))


def _kahan_add(weights: list[torch.Tensor], deltas: list[torch.Tensor], buffers: list[torch.Tensor]) -> None:
    """Compensated ``w += d``: one foreach op per operation for every weight (one launch each on a GPU)."""
    wide = [w.float() for w in weights]  # exact
    torch._foreach_add_(deltas, [c.float() for c in buffers])  # u = d + c (the deltas are the caller's temporaries)
    new = torch._foreach_add(wide, deltas)  # w + u in fp32, then rounded once
    torch._foreach_copy_(weights, new)
    torch._foreach_sub_(deltas, torch._foreach_sub([w.float() for w in weights], wide))  # u - (w' - w): what was lost
    torch._foreach_copy_(buffers, deltas)


def stochastic_round(x: torch.Tensor, noise: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 ``x`` rounded to the 16-bit ``dtype``, to one of its two neighbours, unbiased: the one farther from x with
    probability |x - nearest| / gap. ``noise``: int32 draws uniform in [0, 2^16), x's shape. Exact values stay.

    bf16 is fp32's upper half: the draw is added to the 16 bits bf16 drops and they are cut off (the larger
    magnitude with probability dropped / 2^16; the add and the cut act on the bits, so a compiler cannot skip a
    rounding). fp16 takes the neighbour of x's nearest value towards x, chosen when noise / 2^16 < |error| / gap."""
    if dtype == torch.bfloat16:
        return ((x.view(torch.int32) + noise) & -65536).view(torch.float32).to(dtype)  # exact: the low bits are 0
    nearest = x.to(dtype)
    error = x - nearest.float()  # exact in fp32
    other = _neighbour(nearest, error > 0)
    gap = other.float() - nearest.float()
    return torch.where(noise.float() / 2**16 * gap.abs() < error.abs(), other, nearest)


def _neighbour(value: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The next 16-bit float after ``value`` upwards (``up``) or downwards, by its bits: the magnitude bits step away
    from zero or towards it; zero steps to the smallest subnormal of the sign asked for."""
    bits = value.view(torch.int16).to(torch.int32)  # sign bit on top: +1 is one step away from zero for either sign
    stepped = bits + torch.where(up == (value > 0), 1, -1)
    stepped = torch.where(value == 0, torch.where(up, 1, -32767), stepped)  # -32767: the bits 0x8001 as an int16
    return stepped.to(torch.int16).view(value.dtype)


def _noise(counter: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """int32 draws uniform in [0, 2^16) of int64 counters < 2^32 under the 32-bit key halves ``low``, ``high``."""
    return (_hash32(_hash32(counter ^ low) ^ high) >> 16).to(torch.int32)


def _counters(rows: int, cols: int, row: int, col: int, width: int, device: torch.device) -> torch.Tensor:
    """The noise counters (rows, cols), int64, of a block at (row, col) of a parameter ``width`` wide."""
    r = torch.arange(rows, device=device, dtype=torch.int64) + row
    c = torch.arange(cols, device=device, dtype=torch.int64) + col
    return r.view(-1, 1) * width + c


def _stochastic_add_eager(weight: torch.Tensor, delta: torch.Tensor, row: int, col: int, width: int, low: int,
                          high: int) -> torch.Tensor:
    """``stochastic_round(weight + delta)`` of a (rows, cols) block at (row, col) of a parameter ``width`` wide, its
    noise under the key (low, high): compiled, one kernel (the ints are symbolic inputs: a new step compiles
    nothing)."""
    noise = _noise(_counters(*weight.shape, row, col, width, weight.device), low, high)  # (rows, cols)
    return stochastic_round(weight.float() + delta, noise, weight.dtype)


_stochastic_add_bf16 = fused(_stochastic_add_eager)


def _stochastic_add(weight: torch.Tensor, *args: int | torch.Tensor) -> torch.Tensor:
    """bf16 compiled; fp16 eager (a compiled fp32 -> fp16 -> fp32 round trip may skip its rounding)."""
    run = _stochastic_add_bf16 if weight.dtype == torch.bfloat16 else _stochastic_add_eager
    return run(weight, *args)


def noise_bits(shape: torch.Size, key: int, place: Place, device: torch.device) -> torch.Tensor:
    """The draws (int32, uniform in [0, 2^16)) of ``shape`` (viewed as (rows, cols)) under the 63-bit ``key``: the
    element at (row, col) of the whole parameter draws from its counter row * width + col only (``Place``)."""
    rows = shape[0] if len(shape) else 1
    cols = int(torch.Size(shape).numel()) // max(rows, 1) if rows else 0
    width = cols if place.width is None else place.width
    counters = _counters(rows, cols, place.row, place.col, width, device)
    return _noise(counters, key & MASK32, (key >> 32) & MASK32).view(shape)
