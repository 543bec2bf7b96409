"""Keyed random numbers: the same draws on every rank and after a resume, wherever they are drawn.

``generator(seed, *key)`` is a CPU generator keyed by (seed, *key): the first step's Gaussian warm start of the
P R^T split and the stochastic-rounding noise come from it on CPU. A draw on the host would cost an accelerator
a host-to-device copy (a CUDA graph cannot even hold one), so there ``keyed_normal`` draws the Gaussian on the
device itself, from a counter-based hash of (key, element index): integer ops only before Box-Muller, no
generator state, and one fused kernel for every member of a shape group. Its values are not the CPU
generator's: a run keeps one device type from its first step on (a checkpoint carries the drawn factors, so a
resume on another device type continues exactly from them).
"""

from __future__ import annotations

import functools
import math

import torch

from .kernels import fused

MASK32 = 0xFFFF_FFFF


def key_of(seed: int, *key: int) -> int:
    """A 63-bit integer of (seed, *key) (Python's hash of a tuple of ints: the same in every process)."""
    return hash((seed, *key)) & 0x7FFF_FFFF_FFFF_FFFF


def generator(seed: int, *key: int) -> torch.Generator:
    """A CPU generator keyed by (seed, *key): identical on every rank and after a resume."""
    g = torch.Generator(device="cpu")
    g.manual_seed(key_of(seed, *key))
    return g


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds, murmur-style constants below 2^31) of int64 values in
    [0, 2^32): every product stays below 2^63, so no signed overflow happens on any device."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & MASK32
    return x ^ (x >> 16)


def _normal(counter: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Standard normal values (fp32) of int64 counters < 2^31 under 32-bit keys ``low``, ``high`` (broadcast)."""
    a = _hash32(_hash32((2 * counter) ^ low) ^ high)
    b = _hash32(_hash32((2 * counter + 1) ^ low) ^ high)
    u1 = (a.float() + 0.5) / 2**32  # (0, 1): the log is finite
    u2 = b.float() / 2**32
    return torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * math.pi * u2)  # Box-Muller


_normal_fused = fused(_normal)


@functools.lru_cache(maxsize=4096)
def device_keys(seed: int, keys: tuple[tuple[int, ...], ...], device: torch.device) -> torch.Tensor:
    """The keys (seed, *key) of ``keys`` as an int64 tensor (len(keys),) on ``device``: made once per process (a
    host-to-device copy, on a first step), then reused."""
    return torch.tensor([key_of(seed, *key) for key in keys], dtype=torch.int64, device=device)


def keyed_normal(shape: tuple[int, ...], keys: torch.Tensor) -> torch.Tensor:
    """Standard normal values (k, *shape), fp32, on ``keys``' device: row i drawn under the 63-bit key ``keys[i]``
    (``key_of``), element j of it from the counter j. ``keys`` is an int64 tensor (k,)."""
    n = math.prod(shape)
    if n >= 2**31:
        raise ValueError(f"keyed_normal draws at most 2^31 values per key, got shape {shape}")
    counter = torch.arange(n, device=keys.device, dtype=torch.int64)  # (n,)
    k = keys.view(-1, 1)  # (k, 1)
    return _normal_fused(counter, k & MASK32, (k >> 32) & MASK32).view(-1, *shape)
