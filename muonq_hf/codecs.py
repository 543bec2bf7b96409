"""Quantization codecs: the one place that turns fp32 tensors into packed low-bit codes and back.

Two codecs live here:

* ``quantize`` / ``dequantize``: symmetric 4- or 8-bit codes of (optionally) mu-law companded values,
  with absmax scales per group of elements (whole matrix, column, or row block). The MuonQ momentum.
* ``quantize_dynamic8`` / ``dequantize_dynamic8``: bitsandbytes-style blockwise 8-bit codes through a
  dynamic (exponent-like) map, for AdamW's m (signed) and v (unsigned).

All functions are pure: tensors in, tensors out. Codes are packed along the last dim, so the codes of a
row shard of a matrix are a row shard of the codes.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .kernels import fused

QMAX = {4: 7, 8: 127}
_LITTLE_ENDIAN = sys.byteorder == "little"
SCALE_FLOOR = 2.0**-24  # the smallest positive fp16 (a 1e-8 floor was 0 in fp16)


# --------------------------------------------------------------------------------------- mu-law companding
def compand(x: torch.Tensor, mu: float) -> torch.Tensor:
    """C(x) = sign(x) ln(1 + mu|x|) / ln(1 + mu). Identity for mu = 0.

    Defined on all reals (no clamp): for inputs in [-1, 1] (normalized momentum) it matches the reference
    code, and an unnormalized input is still encoded faithfully instead of being clipped.
    """
    if mu == 0:
        return x
    # copysign and in-place steps: the same values as sign(x) * ..., in 3 passes over x instead of 6
    return torch.copysign(torch.log1p(x.abs().mul_(mu)).div_(math.log1p(mu)), x)


def expand(y: torch.Tensor, mu: float) -> torch.Tensor:
    """C^-1(y) = sign(y) ((1 + mu)^|y| - 1) / mu. Identity for mu = 0."""
    if mu == 0:
        return y
    return torch.copysign(torch.expm1(y.abs().mul_(math.log1p(mu))).div_(mu), y)


# ------------------------------------------------------------------------------------------- 4-bit packing
def pack4(q: torch.Tensor) -> torch.Tensor:
    """Integer codes in [-8, 7] (any dtype), (..., n) -> uint8 (..., ceil(n/2)), two per byte, low nibble first."""
    return pack_nibbles(code_bytes(q, 4))


def pack_nibbles(u: torch.Tensor) -> torch.Tensor:
    """uint8 (..., n) of values 0..15 (codes + 8) -> uint8 (..., ceil(n/2)), two per byte, low nibble first."""
    u = u.contiguous()  # rows contiguous
    if u.size(-1) % 2:
        u = torch.nn.functional.pad(u, (0, 1), value=8)  # pad with the code of zero
    if not _LITTLE_ENDIAN:
        return u[..., 0::2] | (u[..., 1::2] << 4)
    # Two neighbouring bytes read as one int16 w = lo + 256 hi (little-endian): w | (w >> 4) holds lo + 16 hi in
    # its low byte. No stride-2 reads. Eager, on purpose: ATen's int16 ops are vectorized, while inductor
    # compiles this loop into scalar code (768 x 3072 on CPU: 0.17 vs 0.6 ms; a stride-2 pack: 2 ms).
    w = u.view(torch.int16)
    return (w | (w >> 4)).to(torch.uint8)


def unpack4(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 (..., ceil(n/2)) -> int8 codes (..., n)."""
    lo = (packed & 0x0F).to(torch.int8) - 8
    hi = (packed >> 4).to(torch.int8) - 8
    return torch.stack((lo, hi), dim=-1).flatten(-2)[..., :n]


def packed_width(n: int, bits: int) -> int:
    return (n + 1) // 2 if bits == 4 else n


# ------------------------------------------------------------------------------------- scale granularities
def group_absmax(y: torch.Tensor, granularity: str, block_size: int | None) -> torch.Tensor:
    """max|y| per scale group, shaped to broadcast against y (..., m, n).

    granularity: "matrix" (one per trailing (m, n) matrix), "column" (one per column) or "block"
    (blocks of ``block_size`` consecutive elements along each row: row-aligned, so row shards keep theirs).
    """
    a = y.abs()
    if granularity == "matrix":
        return a.amax(dim=(-2, -1), keepdim=True)  # (..., 1, 1)
    if granularity == "column":
        return a.amax(dim=-2, keepdim=True)  # (..., 1, n)
    if granularity == "block":
        n = y.size(-1)
        block_size = min(block_size, n)  # a block wider than the row is the row (no padding to block_size)
        nb = -(-n // block_size)
        if n % block_size:
            a = torch.nn.functional.pad(a, (0, nb * block_size - n))
        return a.unflatten(-1, (nb, block_size)).amax(dim=-1)  # (..., m, nb)
    raise ValueError(f"granularity must be 'matrix', 'column' or 'block', got {granularity!r}")


def _broadcast_scale(scale: torch.Tensor, granularity: str, n: int, block_size: int | None) -> torch.Tensor:
    if granularity == "block":
        return scale.repeat_interleave(min(block_size, n), dim=-1)[..., :n]
    return scale


def round_codes(z: torch.Tensor, qmax: int, stochastic: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """Round to integers in [-qmax-1, qmax] (fp32 values): nearest-even, or stochastic (unbiased) with
    ``generator``."""
    if stochastic:
        # drawn on the CPU generator, then moved: the same codes on every device and after a resume
        noise = torch.rand(z.shape, generator=generator, dtype=z.dtype).to(z.device)
        z = torch.floor(z + noise)
    else:
        z = torch.round(z)
    return z.clamp_(-qmax - 1, qmax)


def quantize(
    x: torch.Tensor,
    bits: int,
    mu: float = 0.0,
    granularity: str = "matrix",
    block_size: int | None = None,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
    group_max: Callable[[torch.Tensor], torch.Tensor] | None = None,
    scale_dtype: torch.dtype = torch.float16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Q(x): x (..., m, n) fp32 -> (codes, scale).

    y = C(x); s = max|y| / qmax (in ``scale_dtype``, >= 2^-24, fp16's smallest positive value, so an all-zero
    group gets a usable scale); q = round(y / s). codes are uint8, packed two per byte
    along the last dim for 4 bits ((..., m, ceil(n/2))), int8 viewed as uint8 for 8 bits ((..., m, n)).
    ``group_max`` reduces the per-group max|x| of matrix and column groups across the ranks that hold
    row shards of x (all-reduce max); block groups lie within rows and need no reduction.
    """
    x = x.float()
    absmax = group_absmax(x, granularity, block_size)
    if group_max is not None and granularity != "block":
        absmax = group_max(absmax)
    scale = group_scale(absmax, bits, mu, scale_dtype)
    return encode_codes(x, scale, bits, mu, granularity, block_size, stochastic, generator), scale


def group_scale(absmax: torch.Tensor, bits: int, mu: float, scale_dtype: torch.dtype) -> torch.Tensor:
    """s = max|C(x)| / qmax of each group from its max|x|: C is odd and increasing, so max|C(x)| = C(max|x|)
    and the max pass over x needs no logarithm. In ``scale_dtype``, >= 2^-24."""
    return (compand(absmax, mu) / QMAX[bits]).clamp(min=SCALE_FLOOR).to(scale_dtype)


def encode_codes(
    x: torch.Tensor,
    scale: torch.Tensor,
    bits: int,
    mu: float,
    granularity: str,
    block_size: int | None,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The packed codes round(C(x) / s) of x (..., m, n) with the group scales ``scale``.

    Round to nearest runs as one fused loop (``muonq_hf.kernels``) over x and the per-group ``code_points``;
    stochastic rounding draws its noise on the CPU generator, eagerly.
    """
    if stochastic:
        s = _broadcast_scale(scale.float(), granularity, x.size(-1), block_size)
        return pack_codes(round_codes(compand(x.float(), mu) / s, QMAX[bits], True, generator), bits)
    return nearest_codes(x, code_points(scale, bits, mu), bits, mu, granularity, block_size)


def by_boundaries(bits: int, mu: float) -> bool:
    """Whether nearest codes count level boundaries: 4-bit mu-law (7 comparisons beat a logarithm; 8 bits would
    need 127)."""
    return bits == 4 and mu > 0


def code_points(scale: torch.Tensor, bits: int, mu: float) -> torch.Tensor:
    """What the nearest-code loop compares each group's values with: the level boundaries b_k = C^-1((k - 1/2) s),
    k = 1..qmax (qmax, ...) where ``by_boundaries``, else the scale (1, ...), fp32, each shaped like ``scale``.

    |x| >= b_k iff C(|x|) / s >= k - 1/2, where round(C(x) / s) steps from k - 1 to k (C is increasing).
    Computed here, once per group, so that the compiled loop does not recompute them per element. The level
    comes first: each b_k is contiguous like the scales, so a loop over columns reads it as a vector (with the
    level last, the stride-qmax reads of column scales compiled to a scalar loop: 0.67 vs 0.08 ms for a
    3072 x 48 factor on CPU)."""
    s = scale.float().unsqueeze(0)  # (1, ...)
    if not by_boundaries(bits, mu):
        return s
    halves = torch.arange(0.5, QMAX[bits], device=s.device).view(-1, *[1] * scale.ndim)  # (qmax, 1, ...)
    return expand(s * halves, mu)  # (qmax, ...)


def nearest_code_bytes(
    x: torch.Tensor, points: torch.Tensor, bits: int, mu: float, granularity: str, block_size: int | None
) -> torch.Tensor:
    """The codes round(C(x) / s) of x (..., m, n), one byte per code (``code_bytes``), from ``code_points``.

    With level boundaries: sign(x) times the number of boundaries at or below |x|, without computing C element
    by element (the logarithm had cost 4x the rest of the compiled encode loop on CPU). These are the codes of
    rounding C(x) / s, except for a value within an fp32 rounding of a boundary and an exact tie, which goes up
    instead of to even (3 codes in 12 million on normalized Gaussian matrices).
    """
    n = x.size(-1)
    x = x.float()
    if by_boundaries(bits, mu):
        a = x.abs()
        level = sum((a >= _broadcast_scale(points[k], granularity, n, block_size)).float()
                    for k in range(points.size(0)))  # 0..qmax
        q = torch.where(x < 0, -level, level)
    else:
        s = _broadcast_scale(points[0], granularity, n, block_size)
        q = round_codes(compand(x, mu) / s, QMAX[bits], False)
    return code_bytes(q, bits)


_nearest_code_bytes_fused = fused(nearest_code_bytes)  # one vectorized loop; the packing runs after it, eagerly


def nearest_codes(
    x: torch.Tensor, points: torch.Tensor, bits: int, mu: float, granularity: str, block_size: int | None
) -> torch.Tensor:
    """The stored codes of ``nearest_code_bytes`` (packed two per byte for 4 bits), computed by its fused loop."""
    return store_codes(_nearest_code_bytes_fused(x, points, bits, mu, granularity, block_size), bits)


def code_bytes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (fp32) -> one uint8 per code: q + 8 (0..15) for 4 bits, the int8 q's byte for 8 bits."""
    return (q + 8).to(torch.uint8) if bits == 4 else q.to(torch.int8).view(torch.uint8)


def store_codes(per_code: torch.Tensor, bits: int) -> torch.Tensor:
    """One byte per code (``code_bytes``) -> the stored bytes: two codes per byte for 4 bits, as they are for 8."""
    return pack_nibbles(per_code) if bits == 4 else per_code


def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (fp32) -> stored bytes: two per byte for 4 bits, int8 viewed as uint8 for 8 bits."""
    return store_codes(code_bytes(q, bits), bits)


def dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    n: int,
    bits: int,
    mu: float = 0.0,
    granularity: str = "matrix",
    block_size: int | None = None,
) -> torch.Tensor:
    """DQ(codes, scale) = C^-1(q * s), fp32 (..., m, n)."""
    if codes.numel() == 0:  # e.g. a rank that holds no expert of a stacked tensor
        return torch.zeros(*codes.shape[:-1], n, device=codes.device)
    if granularity == "matrix":
        return _dequantize_by_table(codes, scale, n, bits, mu)
    return _dequantize_fused(codes, scale, n, bits, mu, granularity, block_size)


def _dequantize(
    codes: torch.Tensor, scale: torch.Tensor, n: int, bits: int, mu: float, granularity: str, block_size: int | None
) -> torch.Tensor:
    """``dequantize`` element by element (column and block scales): unpack, scale, expand the mu-law."""
    q = unpack4(codes, n) if bits == 4 else codes.view(torch.int8)
    s = _broadcast_scale(scale.float(), granularity, n, block_size)
    return expand(q.float() * s, mu)


_dequantize_fused = fused(_dequantize)  # a dozen elementwise ops (kernel launches on a GPU) in one loop


def _dequantize_by_table(codes: torch.Tensor, scale: torch.Tensor, n: int, bits: int, mu: float) -> torch.Tensor:
    """``dequantize`` with one scale per matrix, where C^-1(q s) takes only 2^bits values per matrix.

    Those values go into a table indexed by the stored byte (a 4-bit byte holds two codes, low nibble
    first, so its row holds two values, read as one 8-byte word) and one int32 ``index_select`` decodes every
    byte: two passes over the codes instead of unpacking, casting, scaling and expanding the mu-law element by
    element (~15x faster on CPU). Each code decodes to the formula's value for that code.
    """
    lead, (m, width) = codes.shape[:-2], codes.shape[-2:]
    k = math.prod(lead)
    qmax = QMAX[bits]
    levels = torch.arange(-qmax - 1, qmax + 1, dtype=torch.float32, device=codes.device)  # (2^bits,)
    values = expand(levels * scale.float().reshape(k, 1), mu)  # (k, 2^bits): C^-1(q s) for q = -qmax-1..qmax
    table = values[:, _levels_of_byte(bits, codes.device)]  # (k, 256, codes per byte)
    index = codes.reshape(k, m * width).int()
    if k > 1:  # matrix i reads rows [256 i, 256 i + 256) of the stacked tables
        index = index + 256 * torch.arange(k, dtype=torch.int32, device=codes.device).unsqueeze(-1)
    table = table.reshape(k * 256, -1)  # (k 256, values per byte)
    if bits == 4:  # a byte's two fp32 values as one 8-byte word: a 1-D gather, 5x faster than gathering rows
        table = table.contiguous().view(torch.float64)
    out = table.flatten().index_select(0, index.flatten())  # (k m width) words
    return out.view(torch.float32).view(*lead, m, -1)[..., :n]


@functools.lru_cache(maxsize=16)
def _levels_of_byte(bits: int, device: torch.device) -> torch.Tensor:
    """(256, codes per byte) int64: the level index (code + qmax + 1) of each code a stored byte holds."""
    byte = torch.arange(256, dtype=torch.uint8, device=device).unsqueeze(-1)  # (256, 1)
    codes_in_byte = unpack4(byte, 2) if bits == 4 else byte.view(torch.int8)
    return codes_in_byte.long() + QMAX[bits] + 1


# ----------------------------------------------------------- blockwise dynamic 8-bit (AdamW's m and v)
@dataclass(frozen=True)
class DynamicCodebook:
    """The 256-entry dynamic map of bitsandbytes, with tables for an exact nearest-entry search.

    ``torch.bucketize`` over the 255 midpoints is a binary search per element, the slowest op of the
    8-bit AdamW step on CPU. Instead, z's bf16 rounding picks one of 65536 buckets; every fp32 value that
    rounds to that bf16 lies between its two half-way points, and at most one midpoint of the map falls
    there (checked when the tables are built), so ``start[bucket] + (threshold[bucket] < z)`` counts the
    midpoints below z: the same code as ``bucketize``, bit for bit, at two gathers and a compare.
    """

    values: torch.Tensor  # (256,) fp32, sorted
    start: torch.Tensor  # (65536,) uint8 by bucket: midpoints below the lowest value of the bf16 bucket
    threshold: torch.Tensor  # (65536,) fp32 by bucket: the next midpoint (+inf past the last)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Index (uint8) of the entry nearest to z (ties to the lower entry), as ``bucketize`` on midpoints."""
        # bucket = the bf16 bit pattern as a signed int16 + 2^15; int32 index_select is the fastest CPU gather
        bucket = z.to(torch.bfloat16).view(torch.int16).int().add_(2**15).flatten()
        code = self.start.index_select(0, bucket) + (self.threshold.index_select(0, bucket) < z.flatten())
        return code.view(z.shape)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """The map's entries at ``codes`` (uint8), fp32, same shape."""
        return self.values.index_select(0, codes.flatten().int()).view(codes.shape)


def dynamic_map(signed: bool) -> torch.Tensor:
    """The 256 values of bitsandbytes' dynamic 8-bit map (``create_dynamic_map(signed)``, 7 exponent bits).

    A copy of bitsandbytes' ``bitsandbytes.functional.create_dynamic_map`` (MIT license, Tim Dettmers; the
    dynamic data type of "8-Bit Approximations for Parallelism in Deep Learning", arXiv 1511.04561), written
    with the same fp32 operations so the values are bit-identical (tested against bitsandbytes when it is
    installed); the package needs no bitsandbytes at run time. Each power of ten 10^-6 .. 10^0 gets a linear
    grid of means in [0.1, 1); signed maps mirror it; 0 and 1 are added; sorted ascending.
    """
    exponent_bits = 7  # = the 7 non-sign bits of a byte: no extra linear items
    data: list[float] = []
    for i in range(exponent_bits):
        items = 2**i + 1 if signed else 2 ** (i + 1) + 1  # fraction grid of this exponent (+1 boundary)
        boundaries = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(exponent_bits - 1) + i)) * means).tolist()
    data += [0, 1.0]
    data += [0] * (256 - len(data))  # the unsigned map has one spare slot, filled with 0 as bitsandbytes does
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


@functools.lru_cache(maxsize=8)
def dynamic_codebook(signed: bool, device: torch.device | str = "cpu") -> DynamicCodebook:
    """The codebook of the dynamic map (``dynamic_map(signed)``) on ``device`` (built once, cached)."""
    values = dynamic_map(signed).sort().values  # (256,)
    midpoints = ((values[1:] + values[:-1]) / 2).double()  # (255,), exact in fp64
    bf16 = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)  # by bucket
    below, above = _bf16_neighbours(bf16)
    center = bf16.double()
    finite = center.isfinite()
    low = ((below + center) / 2).where(finite, 0.0)  # every fp32 that rounds to `center` is in [low, high]
    high = ((center + above) / 2).where(finite, 0.0)
    start = torch.searchsorted(midpoints, low, right=False)  # midpoints < low
    end = torch.searchsorted(midpoints, high, right=True)  # midpoints <= high
    if int((end - start).max()) > 1:
        raise AssertionError("two midpoints of the dynamic map share a bf16 bucket; the table search is inexact")
    threshold = torch.cat([midpoints.float(), midpoints.new_tensor([math.inf]).float()])[start]
    return DynamicCodebook(values.to(device), start.to(torch.uint8).to(device), threshold.to(device))


def _bf16_neighbours(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The next bf16 values below and above each of b (fp64), across the sign change at zero."""
    bits = b.view(torch.int16).int()
    positive = bits >= 0
    up = torch.where(positive, bits + 1, bits - 1).where(bits != -(2**15), 1)  # -0 -> +tiny
    down = torch.where(positive, bits - 1, bits + 1).where(bits != 0, -(2**15) + 1)  # +0 -> -tiny
    return tuple(i.to(torch.int16).view(torch.bfloat16).double() for i in (down, up))


def quantize_dynamic8(
    x: torch.Tensor, codebook: DynamicCodebook, block_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (m, n) -> (codes uint8 (m, n), absmax fp32 (m, ceil(n/block))): nearest entry of the codebook.

    Blocks run along rows (not over the flattened tensor) so that row shards own whole blocks.
    """
    absmax = group_absmax(x, "block", block_size).clamp(min=1e-12)
    z = x / _broadcast_scale(absmax, "block", x.size(-1), block_size)
    return codebook.nearest(z), absmax.float()


def dequantize_dynamic8(
    codes: torch.Tensor, absmax: torch.Tensor, codebook: DynamicCodebook, block_size: int = 256
) -> torch.Tensor:
    return codebook.decode(codes) * _broadcast_scale(absmax, "block", codes.size(-1), block_size)
