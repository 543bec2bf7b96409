"""Newton-Schulz orthogonalization: the one place in the package that computes Muon's polar factor."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .precision import bf16_matmul

# Keller Jordan's quintic coefficients: chosen to maximise the slope at zero, not to converge exactly;
# singular values land in roughly [0.7, 1.2], which is all Muon needs.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)

# Polar Express (Amsel, Persson, Musco, Gower 2025, arXiv 2505.16932, Algorithm 1): a quintic per iteration,
# each optimal for the worst case of the singular values it receives, so the iteration converges to the polar
# factor instead of plateauing; the first n - 1 divided by 1.01, 1.01^3, 1.01^5 and the input by 1.01 more, for
# bf16 (its safety factor); iterations past the list repeat the last one.
_POLAR_EXPRESS = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
POLAR_EXPRESS = tuple((a / 1.01, b / 1.01**3, c / 1.01**5) for a, b, c in _POLAR_EXPRESS[:-1]) + _POLAR_EXPRESS[-1:]


def coefficient_schedule(name: str, steps: int) -> tuple[list[tuple[float, float, float]], float]:
    """The (a, b, c) of each of ``steps`` iterations and the factor the Frobenius norm is multiplied by before
    dividing the input by it, for the ``ns_coefficients`` option: "quintic" or "polar_express"."""
    if name == "quintic":
        return [NS_COEFFICIENTS] * steps, 1.0
    if name == "polar_express":
        return [POLAR_EXPRESS[min(i, len(POLAR_EXPRESS) - 1)] for i in range(steps)], 1.01
    raise ValueError(f"ns_coefficients={name!r} is not allowed; it must be 'quintic' or 'polar_express'")


NS_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}  # the ns_dtype option


def zeropower_via_newtonschulz5(
    G: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16, scale: float = 1.0,
    coefficients: str = "quintic",
) -> torch.Tensor:
    """Approximate U V^T of G = U S V^T by a quintic Newton-Schulz iteration, times ``scale``; ``coefficients``
    names the schedule (``coefficient_schedule``: Keller Jordan's quintic or Polar Express).

    G: (..., m, n), batched over leading dims. Returns a tensor of G's shape in ``dtype``: bf16 by default, as
    torch.optim.Muon and Keller Jordan's Muon run it (stable in bf16, 4x faster than fp32 on CPUs with bf16
    dot products, tensor cores on GPUs); fp32 for exact comparisons. ``scale`` (Muon's update scale) goes into
    the last iteration's fused matmul: one rounding, and no pass over the result to scale it.
    """
    assert G.ndim >= 2, f"Newton-Schulz needs a matrix, got shape {tuple(G.shape)}"
    X = G.to(dtype).reshape(-1, *G.shape[-2:])  # (k, m, n)
    tall = G.size(-2) > G.size(-1)  # iterate on the short side: the Gram matrix is (min, min)
    schedule, margin = coefficient_schedule(coefficients, steps)
    norm = X.norm(dim=(-2, -1), keepdim=True)
    X = X / ((norm if margin == 1.0 else norm * margin) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    blocks = symmetric_blocks(min(G.shape[-2:])) if X.device.type == "cpu" else 1
    if blocks > 1 and X.size(0) > 0:  # CPU, >= 384 wide: one matrix at a time, 2-D addmm (bf16: 6-15% faster than
        Xs = [_iterate(x, schedule, torch.addmm, tall, scale, blocks) for x in X]  # baddbmm), symmetric products
        X = Xs[0].unsqueeze(0) if len(Xs) == 1 else torch.stack(Xs)  # by blocks
    elif X.size(0) == 1 and X.device.type != "cpu":  # one matrix on a GPU: 2-D addmm
        X = _iterate(X[0], schedule, torch.addmm, tall, scale).unsqueeze(0)
    else:  # a batch (a shape group; on CPU, small matrices: the same values as one by one), or an empty expert
        X = _iterate(X, schedule, torch.baddbmm, tall, scale)  # shard: one call per product
    return X.reshape(G.shape)


def symmetric_blocks(s: int) -> int:
    """Column blocks of an (s, s) symmetric product on CPU: blocks ~192 wide, at most 8 (1: one plain product).

    Measured on CPU, bf16, 1 thread (benchmarks/RESULTS.md): X X^T of 768 x 3072 in 4 blocks 4.8 vs 7.1 ms, of
    768 x 768 1.4 vs 1.8 ms; of 2048 x 4096 in 8 blocks 50 vs 79 ms. Below 384 a plain product is as fast."""
    return max(1, min(8, s // 192))


def symmetric_mm(
    L: torch.Tensor,
    R: torch.Tensor,
    blocks: int,
    C: torch.Tensor | None = None,
    beta: float = 0.0,
    alpha: float = 1.0,
    fused_mm: Callable[..., torch.Tensor] = torch.addmm,
) -> torch.Tensor:
    """L @ R (or beta C + alpha L @ R) where the result is known to be symmetric (s, s): L (s, k), R (k, s).

    With ``blocks`` < 2 it is one plain product (``fused_mm``: addmm, or baddbmm for a batch (b, s, k)).
    Otherwise (2-D) only the upper part [0, end) x [start, end) of each block column is computed, by one (add)mm,
    and each block below the diagonal is a copy of the transposed block above it: (1 + 1/blocks) / 2 of the
    multiply-adds. Each computed element is the plain product's dot product (the same values on this project's
    CPU; tested to one rounding of the dtype).
    """
    if blocks < 2:
        return bf16_matmul(L, R, C, beta, alpha, fused_mm)
    s = L.size(0)
    out = L.new_empty(s, s)
    edges = [s * j // blocks for j in range(blocks + 1)]
    for start, end in zip(edges[:-1], edges[1:], strict=True):  # block column [start, end), rows [0, end)
        C_block = None if C is None else C[:end, start:end]
        out[:end, start:end] = bf16_matmul(L[:end], R[:, start:end], C_block, beta, alpha, fused_mm)
    for start, end in zip(edges[1:-1], edges[2:], strict=True):  # rows [start, end) left of the diagonal
        out[start:end, :start] = out[:start, start:end].mT
    return out


def _iterate(
    X: torch.Tensor,
    schedule: list[tuple[float, float, float]],
    fused_mm: Callable[..., torch.Tensor],
    tall: bool,
    scale: float = 1.0,
    blocks: int = 1,
) -> torch.Tensor:
    """One quintic iteration per (a, b, c) of ``schedule`` on X (m, n) or (k, m, n), the last one times ``scale``;
    ``fused_mm`` is addmm or baddbmm. With ``blocks`` > 1 (2-D X) the two symmetric products are computed by
    ``symmetric_mm``.

    A wide X (m <= n) iterates X <- a X + B X with B = b A + c A^2, A = X X^T (m, m). A tall X iterates the
    transpose of that on X^T, written on X itself: A = X^T X (n, n), X <- a X + X B^T. The values are those of
    the wide iteration on X^T, and the result is in X's own layout: no transposed copy of the input, and no
    transposed (strided) read when the update is added to the weight (5.6 vs 0.45 ms for 3072 x 768 on CPU).
    """
    steps = len(schedule)
    for i, (a, b, c) in enumerate(schedule):
        f = scale if i == steps - 1 else 1.0
        A = symmetric_mm(X.mT, X, blocks) if tall else symmetric_mm(X, X.mT, blocks)  # (k, s, s), s = min(m, n)
        B = symmetric_mm(A, A, blocks, A, beta=b, alpha=c, fused_mm=fused_mm)  # b A + c A A (symmetric: A is)
        # f (a X + X B^T), or f (a X + B X)
        X = bf16_matmul(X, B.mT, X, a * f, f, fused_mm) if tall else bf16_matmul(B, X, X, a * f, f, fused_mm)
    return X if steps else X * scale


def muon_scale(m: int, n: int) -> float:
    """Moonlight's factor 0.2*sqrt(max(m, n)): gives the update AdamW's RMS, so one lr serves both groups."""
    return 0.2 * math.sqrt(max(m, n))
