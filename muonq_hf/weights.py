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

from .keyed import MASK32, _hash32, key_of

WEIGHT_UPDATES = ("nearest", "stochastic", "kahan")
LOW_PRECISION = (torch.bfloat16, torch.float16)
KAHAN = "weight_kahan"  # the state entry of a Kahan-compensated weight
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
        target = weight.float() + delta
        noise = uniform_noise(weight.shape, key_of(group["seed"], *key, NOISE_KIND), place, weight.device)
        weight.copy_(stochastic_round(target, noise, weight.dtype))


def _kahan_add(weights: list[torch.Tensor], deltas: list[torch.Tensor], buffers: list[torch.Tensor]) -> None:
    """Compensated ``w += d``: one foreach op per operation for every weight (one launch each on a GPU)."""
    wide = [w.float() for w in weights]  # exact
    torch._foreach_add_(deltas, [c.float() for c in buffers])  # u = d + c (the deltas are the caller's temporaries)
    new = torch._foreach_add(wide, deltas)  # w + u in fp32, then rounded once
    torch._foreach_copy_(weights, new)
    torch._foreach_sub_(deltas, torch._foreach_sub([w.float() for w in weights], wide))  # u - (w' - w): what was lost
    torch._foreach_copy_(buffers, deltas)


def stochastic_round(x: torch.Tensor, noise: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 ``x`` rounded to ``dtype``, to one of its two neighbours: the farther one with probability
    |x - nearest| / |gap|, where ``noise`` (uniform in [0, 1), x's shape) falls below it. Unbiased; exact values
    stay; a value past the dtype's range rounds to inf as nearest does."""
    nearest = x.to(dtype)
    error = x - nearest.float()  # exact in fp32
    other = torch.nextafter(nearest, torch.where(error > 0, torch.inf, -torch.inf).to(dtype))
    gap = other.float() - nearest.float()
    return torch.where(noise * gap.abs() < error.abs(), other, nearest)


def uniform_noise(shape: torch.Size, key: int, place: Place, device: torch.device) -> torch.Tensor:
    """Uniform fp32 draws in [0, 1) of ``shape`` (viewed as (rows, cols)) under the 63-bit ``key``: the element at
    (row, col) of the whole parameter draws from its counter row * width + col only (``Place``), on the device, with
    no generator and no host-to-device copy."""
    rows = shape[0] if len(shape) else 1
    cols = int(torch.Size(shape).numel()) // max(rows, 1) if rows else 0
    width = cols if place.width is None else place.width
    r = torch.arange(place.row, place.row + rows, device=device, dtype=torch.int64)
    c = torch.arange(place.col, place.col + cols, device=device, dtype=torch.int64)
    counter = r.view(-1, 1) * width + c  # (rows, cols)
    if rows and (place.row + rows) * width >= 2**32:
        raise ValueError(f"MuonQ: weight_update='stochastic' keys at most 2^32 elements per parameter, got {shape}")
    bits = _hash32(_hash32(counter ^ (key & MASK32)) ^ ((key >> 32) & MASK32))
    return (bits.float() / 2**32).view(shape)
