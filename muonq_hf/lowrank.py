"""The power-iteration low-rank split of MuonQ: M = P R^T + residual, one warm-started step per update."""

from __future__ import annotations

from collections.abc import Callable

import torch

# Reduces a tensor summed over the rows of a row-sharded matrix; identity in a single process.
RowSum = Callable[[torch.Tensor], torch.Tensor]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def rank_for(m: int, n: int, rank_divisor: int) -> int:
    """r = floor(min(m, n) / rank_divisor); 0 (no split) when rank_divisor is 0 or the matrix is too small."""
    return min(m, n) // rank_divisor if rank_divisor > 0 else 0


def orthonormalize_columns(P: torch.Tensor, row_sum: RowSum = _identity) -> torch.Tensor:
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
        return torch.linalg.solve_triangular(L, P.mT, upper=False).mT  # P L^-T
    evals, evecs = torch.linalg.eigh(gram)
    keep = evals > 1e-10 * evals.amax(dim=-1, keepdim=True).clamp(min=1e-30)
    inv_sqrt = torch.where(keep, evals.clamp(min=1e-30).rsqrt(), torch.zeros_like(evals))
    return P @ (evecs * inv_sqrt.unsqueeze(-2))


def power_iteration_split(
    M: torch.Tensor, R_prev: torch.Tensor, row_sum: RowSum = _identity
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One warm-started power-iteration step: M (..., m, n) ~ P R^T + res.

    R_prev (..., n, r) is last step's right factor (or a seeded Gaussian on the first step).
    Returns P (..., m, r) with orthonormal columns, R = M^T P (..., n, r) and res = M - P R^T (..., m, n).
    """
    Q = R_prev / (R_prev.norm(dim=-2, keepdim=True) + 1e-7)  # (..., n, r) column-normalized warm start
    P = orthonormalize_columns(M @ Q, row_sum)  # (..., m, r)
    R = row_sum(M.mT @ P)  # (..., n, r)
    res = M - P @ R.mT  # (..., m, n)
    return P, R, res
