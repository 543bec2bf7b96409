"""The power-iteration low-rank split of MuonQ: M = P R^T + residual, one warm-started step per update."""

from __future__ import annotations

from collections.abc import Callable

import torch

# Reduces a tensor summed over the rows of a row-sharded matrix; identity in a single process.
RowSum = Callable[[torch.Tensor], torch.Tensor]


def no_reduction(t: torch.Tensor) -> torch.Tensor:
    """The ``RowSum`` of a matrix held whole by one process (no shards to reduce over)."""
    return t


def rank_for(m: int, n: int, rank_divisor: int) -> int:
    """r = floor(min(m, n) / rank_divisor); 0 (no split) when rank_divisor is 0 or the matrix is too small."""
    return min(m, n) // rank_divisor if rank_divisor > 0 else 0


def orthonormalize_columns(P: torch.Tensor, row_sum: RowSum = no_reduction) -> torch.Tensor:
    """Orthonormal basis of the column space of P (..., m, r), computed from the r x r Gram matrix.

    Cholesky-QR: G = P^T P = L L^T, Q = P L^-T. It needs only the (all-reduced) Gram matrix, so a
    row-sharded P is orthonormalized without gathering it. If G is ill-conditioned (Cholesky fails or
    cond(G) > 1e8, i.e. cond(P) > 1e4 where fp32 Cholesky-QR loses orthogonality) the eigendecomposition
    G = V diag(l) V^T gives Q = P V diag(l)^-1/2, with directions of l ~ 0 dropped (zero columns).
    """
    gram = row_sum(P.mT @ P)  # (..., r, r)
    L, info = torch.linalg.cholesky_ex(gram)
    diag = L.diagonal(dim1=-2, dim2=-1)
    well_conditioned = bool((info == 0).all()) and bool(
        (diag.amin(dim=-1) ** 2 > 1e-8 * diag.amax(dim=-1) ** 2).all()
    )
    if well_conditioned:
        return torch.linalg.solve_triangular(L.mT, P, upper=True, left=False)  # P L^-T, solved on P's own layout
    evals, evecs = torch.linalg.eigh(gram)
    keep = evals > 1e-10 * evals.amax(dim=-1, keepdim=True).clamp(min=1e-30)
    inv_sqrt = torch.where(keep, evals.clamp(min=1e-30).rsqrt(), torch.zeros_like(evals))
    return P @ (evecs * inv_sqrt.unsqueeze(-2))


def product(A: torch.Tensor, B: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A @ B with the inputs in ``dtype`` (fp32 accumulation), in ``dtype``: adding it to an fp32 tensor promotes
    it on the fly, without a separate fp32 copy of the (m, n) product."""
    return A.to(dtype) @ B.to(dtype)


def power_iteration_factors(
    M: torch.Tensor,
    R_prev: torch.Tensor,
    row_sum: RowSum = no_reduction,
    dtype: torch.dtype = torch.float32,
    M_low: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One warm-started power-iteration step: the factors of M (..., m, n) ~ P R^T.

    R_prev (..., n, r) is last step's right factor (or a seeded Gaussian on the first step).
    Returns P (..., m, r) with orthonormal columns and R = M^T P (..., n, r). M Q takes its inputs in ``dtype``
    (bf16 where the results are stored in 4 or 8 bits: its 0.4% rounding is far below a code's step; ``M_low``
    is M already in ``dtype``, when the caller has it); R = M^T P and the r x r Gram matrix, which sum over
    rows, stay fp32.
    """
    Q = R_prev / (R_prev.norm(dim=-2, keepdim=True) + 1e-7)  # (..., n, r) column-normalized warm start
    P = orthonormalize_columns(product(M if M_low is None else M_low, Q, dtype).float(), row_sum)  # (..., m, r)
    # R sums over the rows, which FSDP2 holds in shards: fp32, so that partial sums are not rounded to bf16
    R = row_sum((P.mT @ M).mT)  # (..., n, r) = (P^T M)^T: M stays the contiguous operand
    return P, R


def residual(M: torch.Tensor, low_rank: torch.Tensor | None) -> torch.Tensor:
    """res = M - P R^T (..., m, n) from the product ``low_rank`` (None: no split, res = M); a bf16 product is
    promoted on the fly."""
    return M if low_rank is None else M - low_rank
