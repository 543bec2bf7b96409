"""Power-iteration split against torch.linalg.svd, and the Cholesky-QR with its fallback."""

import torch

from muonq_hf.lowrank import (
    fp32_matmuls_in_bf16,
    orthonormalize_columns,
    power_iteration_factors,
    product,
    rank_for,
    residual,
)


def principal_cosines(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between the column spaces of orthonormal A and B."""
    return torch.linalg.svdvals(A.mT @ B)


def test_rank_for():
    assert rank_for(768, 768, 16) == 48
    assert rank_for(768, 2304, 16) == 48
    assert rank_for(10, 1000, 16) == 0  # too small for a split: that matrix is stored whole
    assert rank_for(768, 768, 0) == 0


def test_split_is_exact_and_p_is_orthonormal():
    torch.manual_seed(0)
    M = torch.randn(2, 64, 48)
    P, R = power_iteration_factors(M, torch.randn(2, 48, 4))
    res = residual(M, product(P, R.mT, torch.float32))
    assert P.shape == (2, 64, 4) and R.shape == (2, 48, 4) and res.shape == M.shape
    torch.testing.assert_close(P.mT @ P, torch.eye(4).expand(2, 4, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(P @ R.mT + res, M, atol=1e-5, rtol=0)
    torch.testing.assert_close(R, M.mT @ P)


def test_warm_started_power_iteration_finds_the_top_singular_subspace():
    """Repeated on a slowly moving matrix (as momentum is), the warm start converges to SVD's top-r."""
    torch.manual_seed(0)
    m, n, r = 96, 64, 6
    U, _ = torch.linalg.qr(torch.randn(m, m))
    V, _ = torch.linalg.qr(torch.randn(n, n))
    S = torch.cat([torch.linspace(10, 5, r), torch.linspace(1, 0.1, n - r)])  # clear gap after r
    M = (U[:, :n] * S) @ V.mT
    R = torch.randn(n, r)
    for _ in range(8):
        P, R = power_iteration_factors(M, R)
    Usvd, _, _ = torch.linalg.svd(M)
    assert principal_cosines(P, Usvd[:, :r]).min() > 0.999
    # the rank-r part captures the energy of the top r singular values
    torch.testing.assert_close((P @ R.mT).norm(), S[:r].norm(), rtol=1e-3, atol=0)


def test_orthonormalize_falls_back_on_rank_deficient_input():
    torch.manual_seed(0)
    base = torch.randn(50, 2)
    P = torch.cat([base, base[:, :1] * 3, torch.zeros(50, 1)], dim=1)  # rank 2 in 4 columns: Cholesky fails
    Q = orthonormalize_columns(P)
    assert torch.isfinite(Q).all()
    norms = Q.norm(dim=0)
    assert (norms > 0.5).sum() == 2  # two orthonormal directions, the dependent ones dropped to zero
    kept = Q[:, norms > 0.5]
    torch.testing.assert_close(kept.mT @ kept, torch.eye(2), atol=1e-4, rtol=0)
    # the kept columns span the column space of P
    proj = kept @ (kept.mT @ base)
    torch.testing.assert_close(proj, base, atol=1e-4, rtol=1e-4)


def test_cholesky_qr_on_row_shards_matches_the_unsharded_split():
    """What a row-sharded caller computes: local Gram matrices and local M^T P, summed over 2 shards (uneven,
    17 + 16 rows), reproduce the unsharded P and R."""
    torch.manual_seed(0)
    M = torch.randn(1, 33, 20)
    R0 = torch.randn(1, 20, 3)
    P, R = power_iteration_factors(M, R0)
    shards = (M[:, :17], M[:, 17:])
    Q = R0 / (R0.norm(dim=-2, keepdim=True) + 1e-7)
    gram = sum((s @ Q).mT @ (s @ Q) for s in shards)  # the all-reduce of the r x r Gram matrices
    L = torch.linalg.cholesky(gram)
    P_shards = [torch.linalg.solve_triangular(L, (s @ Q).mT, upper=False).mT for s in shards]
    R_sharded = sum(s.mT @ p for s, p in zip(shards, P_shards, strict=True))  # the all-reduce of M^T P
    torch.testing.assert_close(torch.cat(P_shards, dim=1), P, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(R_sharded, R, atol=1e-5, rtol=1e-5)


def legacy_getter_works() -> bool:
    try:
        torch.get_float32_matmul_precision()
        return True
    except RuntimeError:
        return False


def test_bf16_split_products_are_fp32_out_and_the_matmul_setting_comes_back():
    """Where the factors are stored in 4/8 bits the split may let oneDNN compute R = M^T P with bf16 arithmetic
    inside: R is fp32 and within bf16 rounding of the fp64 product (0.4% of its norm allowed; 3.7e-7 measured on
    the AMD EPYC of benchmarks/RESULTS.md), and the process's matmul setting is what it was before, also after an
    error inside (torch refuses its legacy getter while the new setting is changed)."""
    flags = torch.backends.mkldnn.matmul
    before, legacy_before = flags.fp32_precision, legacy_getter_works()
    torch.manual_seed(0)
    M = torch.randn(1, 96, 384)
    P, R = power_iteration_factors(M, torch.randn(1, 384, 8), dtype=torch.bfloat16)
    exact = (M.double().mT @ P.double())
    assert R.dtype == torch.float32 and flags.fp32_precision == before
    err = float((R.double() - exact).norm() / exact.norm())
    assert err < 4e-3, f"R off the fp64 product by {err:.2e} of its norm"
    try:
        with fp32_matmuls_in_bf16(True):
            assert flags.fp32_precision == "bf16"
            raise KeyError("inside")
    except KeyError:
        pass
    assert flags.fp32_precision == before and legacy_getter_works() == legacy_before
    with fp32_matmuls_in_bf16(False):
        assert flags.fp32_precision == before
