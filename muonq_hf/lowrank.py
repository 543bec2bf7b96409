"""The power-iteration low-rank split of MuonQ: M = P R^T + residual, one warm-started step per update."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from .precision import bf16_matmul

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
    G = V diag(l) V^T gives Q = P V diag(l)^-1/2, with directions of l ~ 0 dropped (zero columns). Off the CPU,
    where asking whether G is well-conditioned would stop the host until the device answers, each matrix takes
    its plain Cholesky factor where it is well-conditioned and a shifted one where not, selected on the device
    (``orthonormalize_selected``).
    """
    gram = row_sum(P.mT @ P)  # (..., r, r)
    L, info = torch.linalg.cholesky_ex(gram)
    diag = L.diagonal(dim1=-2, dim2=-1)
    fine = (info == 0) & (diag.amin(dim=-1) ** 2 > 1e-8 * diag.amax(dim=-1) ** 2)  # (...,) per matrix
    if P.device.type != "cpu":  # no host decision on an accelerator (a sync)
        return orthonormalize_selected(P, gram, L, fine)
    if bool(fine.all()):
        return torch.linalg.solve_triangular(L.mT, P, upper=True, left=False)  # P L^-T, solved on P's own layout
    evals, evecs = torch.linalg.eigh(gram)
    keep = evals > 1e-10 * evals.amax(dim=-1, keepdim=True).clamp(min=1e-30)
    inv_sqrt = torch.where(keep, evals.clamp(min=1e-30).rsqrt(), torch.zeros_like(evals))
    return P @ (evecs * inv_sqrt.unsqueeze(-2))


def orthonormalize_selected(P: torch.Tensor, gram: torch.Tensor, L: torch.Tensor, fine: torch.Tensor) -> torch.Tensor:
    """``orthonormalize_columns`` without a host decision: P L^-T with, per matrix, the Cholesky factor L of its
    Gram matrix where ``fine`` (well-conditioned), else the factor of gram + d I, d = 1e-8 max diag(gram) (+1e-30,
    so that gram = 0 factors too), which exists for every PSD gram. With the shifted factor P L^-T has singular
    values sqrt(l / (l + d)) for the eigenvalues l of gram: ~1 in the directions P spans well, ~0 in those it does
    not, as the eigendecomposition drops them on CPU."""
    shift = 1e-8 * gram.diagonal(dim1=-2, dim2=-1).amax(dim=-1) + 1e-30  # (...,)
    eye = torch.eye(gram.size(-1), dtype=gram.dtype, device=gram.device)
    shifted = torch.linalg.cholesky_ex(gram + shift[..., None, None] * eye)[0]
    factor = torch.where(fine[..., None, None], L, shifted)  # (..., r, r)
    return torch.linalg.solve_triangular(factor.mT, P, upper=True, left=False)


def product(A: torch.Tensor, B: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A @ B with the inputs in ``dtype`` (fp32 accumulation), in ``dtype``: adding it to an fp32 tensor promotes
    it on the fly, without a separate fp32 copy of the (m, n) product."""
    return bf16_matmul(A.to(dtype), B.to(dtype))


@contextmanager
def fp32_matmuls_in_bf16(enabled: bool) -> Iterator[None]:
    """fp32 matmuls on CPU that oneDNN may compute internally with bf16 arithmetic, fp32 in and out
    (``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``, PyTorch >= 2.9); the previous setting is restored
    on exit. No effect on CUDA, or where ``enabled`` is False or the setting does not exist."""
    flags = getattr(torch.backends.mkldnn, "matmul", None)
    if not enabled or flags is None or not hasattr(flags, "fp32_precision"):
        yield
        return
    before = flags.fp32_precision
    flags.fp32_precision = "bf16"
    try:
        yield
    finally:
        flags.fp32_precision = before


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
    # R sums over the rows, which FSDP2 holds in shards: fp32 out, so that partial sums are not rounded to bf16.
    # Where the factors are stored in 4 or 8 bits (dtype bf16), oneDNN may compute it with bf16 arithmetic inside:
    # 2.4x faster on CPU (768x3072, r = 48: 1.0 vs 2.4 ms; relative error 3.7e-7 vs 2.5e-7 for fp32 here).
    with fp32_matmuls_in_bf16(dtype == torch.bfloat16):
        PtM = P.mT @ M  # (..., r, n): M stays the contiguous operand
    R = row_sum(PtM.mT)  # (..., n, r)
    return P, R


def residual(M: torch.Tensor, low_rank: torch.Tensor | None) -> torch.Tensor:
    """res = M - P R^T (..., m, n) from the product ``low_rank`` (None: no split, res = M); a bf16 product is
    promoted on the fly."""
    return M if low_rank is None else M - low_rank
