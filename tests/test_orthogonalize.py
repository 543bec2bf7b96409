"""Newton-Schulz against the SVD polar factor U V^T."""

import pytest
import torch

from muonq_hf.orthogonalize import (
    NS_COEFFICIENTS,
    POLAR_EXPRESS,
    _iterate,
    coefficient_schedule,
    muon_scale,
    symmetric_blocks,
    symmetric_mm,
    zeropower_via_newtonschulz5,
)


@pytest.mark.parametrize("shape", [(48, 96), (96, 48), (3, 40, 24)])
def test_ns5_is_the_polar_factor_up_to_singular_value_spread(shape):
    torch.manual_seed(0)
    G = torch.randn(*shape)
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    X = zeropower_via_newtonschulz5(G, dtype=torch.float32)
    assert X.shape == G.shape and X.dtype == torch.float32
    D = U.mT @ X @ Vh.mT  # (..., r, r): diagonal iff X has G's singular vectors
    d = D.diagonal(dim1=-2, dim2=-1)
    off = D - torch.diag_embed(d)
    assert off.norm() < 1e-4 * d.norm()  # same singular vectors as G, to fp32 precision
    # Keller's coefficients do not converge to 1: they push every singular value into about [0.68, 1.13]
    # for matrices with condition number < 30 (these: sigma_min / ||G||_F > 0.04)
    assert d.min() > 0.6 and d.max() < 1.2
    polar = U @ Vh
    assert (X - polar).norm() / polar.norm() < 0.3


def test_ns5_bf16_matches_fp32_direction():
    """bf16 is the default (as in torch.optim.Muon): the same direction as fp32 within bf16's precision."""
    torch.manual_seed(1)
    G = torch.randn(64, 128)
    X32 = zeropower_via_newtonschulz5(G, dtype=torch.float32)
    X16 = zeropower_via_newtonschulz5(G)
    assert X16.dtype == torch.bfloat16
    cos = (X16.float() * X32).sum() / (X16.float().norm() * X32.norm())
    assert cos > 0.99


def test_ns5_is_scale_invariant_and_maps_zero_to_zero():
    torch.manual_seed(2)
    G = torch.randn(32, 16)
    ns = lambda x: zeropower_via_newtonschulz5(x, dtype=torch.float32)  # noqa: E731
    torch.testing.assert_close(ns(1e-3 * G), ns(G), atol=1e-5, rtol=0)
    assert torch.equal(ns(torch.zeros(8, 8)), torch.zeros(8, 8))
    assert torch.equal(zeropower_via_newtonschulz5(torch.zeros(8, 8)).float(), torch.zeros(8, 8))  # bf16 too
    assert zeropower_via_newtonschulz5(torch.zeros(0, 8, 4)).shape == (0, 8, 4)  # no matrix: an empty expert shard


def test_muon_scale_matches_adamw_rms():
    assert muon_scale(768, 3072) == pytest.approx(0.2 * 3072**0.5)
    # an orthogonal (m, n) matrix has RMS 1/sqrt(max(m, n)): scaled, the update RMS is 0.2 like AdamW's
    Q, _ = torch.linalg.qr(torch.randn(256, 64))
    rms = (Q * muon_scale(256, 64)).square().mean().sqrt()
    assert rms == pytest.approx(0.2 * (64 / 256) ** 0.5 * (256 / 64) ** 0.5, rel=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(48, 96), (96, 48), (3, 40, 40)])
def test_scale_folded_into_the_last_iteration_and_tall_matrices_iterate_on_the_right(dtype, shape):
    """NS(G, scale=s) is s NS(G) rounded once (within one rounding of the dtype: 2^-8 relative for bf16), and a
    tall G gives the transpose of NS(G^T), in G's own (contiguous) layout."""
    G = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    s = muon_scale(*shape[-2:])
    U = zeropower_via_newtonschulz5(G, dtype=dtype).float()
    scaled = zeropower_via_newtonschulz5(G, dtype=dtype, scale=s)
    assert scaled.dtype == dtype and scaled.is_contiguous()
    tol = 2**-7 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(scaled.float(), s * U, rtol=tol, atol=tol * s * U.abs().max().item())
    transposed = zeropower_via_newtonschulz5(G.mT.contiguous(), dtype=dtype).float().mT
    torch.testing.assert_close(U, transposed, rtol=2 * tol, atol=2 * tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("s", "k", "blocks"), [(384, 1000, 2), (500, 130, 3), (768, 768, 4), (97, 50, 8)])
def test_symmetric_products_by_blocks_are_the_plain_products(dtype, s, k, blocks):
    """X X^T and b A + c A A computed by block columns: the plain product's values, the blocks below the diagonal
    the transposed blocks above it. Each
    element is the same fp32-accumulated dot product rounded once to the dtype; a BLAS may sum a block in
    another order, which moves an fp32 sum by ulps and can cross one rounding boundary of the dtype (2^-8
    relative for bf16), so that is the tolerance (on the CPU of this project's CI the values are equal)."""
    g = torch.Generator().manual_seed(s)
    X = torch.randn(s, k, generator=g).to(dtype)
    tol = 2**-8 if dtype == torch.bfloat16 else 1e-6
    A = symmetric_mm(X, X.mT, blocks)
    assert A.dtype == dtype
    e = s * (blocks - 1) // blocks  # the last block column starts here
    assert torch.equal(A[e:, :e], A[:e, e:].mT)
    plain = X @ X.mT
    torch.testing.assert_close(A, plain, rtol=tol, atol=tol * plain.abs().max().item())
    b, c = NS_COEFFICIENTS[1:]
    B = symmetric_mm(A, A, blocks, A, beta=b, alpha=c)
    assert torch.equal(B[e:, :e], B[:e, e:].mT)
    plain = torch.addmm(A, A, A, beta=b, alpha=c)
    torch.testing.assert_close(B, plain, rtol=tol, atol=tol * plain.abs().max().item())


@pytest.mark.parametrize("shape", [(768, 1536), (1536, 768)])
def test_newton_schulz_with_blocked_products_is_the_plain_iteration(shape):
    """CPU Newton-Schulz computes its two symmetric products by blocks (768: 4 blocks, ~3/5 of their work): the
    update of the plain iteration, to one bf16 rounding per element (relative Frobenius 2^-8; bf16 NS itself is
    ~1% from fp32 NS)."""
    G = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    assert symmetric_blocks(768) == 4
    X = G.bfloat16()
    X = X / (X.norm() + 1e-7)  # as zeropower_via_newtonschulz5 scales its input
    tall = shape[0] > shape[1]
    blocked = _iterate(X, [NS_COEFFICIENTS] * 5, torch.addmm, tall, 2.0, blocks=4)
    plain = _iterate(X, [NS_COEFFICIENTS] * 5, torch.addmm, tall, 2.0, blocks=1)
    error = ((blocked.float() - plain.float()).norm() / plain.float().norm()).item()
    assert error <= 2**-8, f"blocked NS differs from the plain iteration by {error:.2e} (relative Frobenius)"
    torch.testing.assert_close(zeropower_via_newtonschulz5(G, scale=2.0), blocked)  # the CPU default


def test_symmetric_blocks_are_about_192_wide_and_at_most_8():
    assert [symmetric_blocks(s) for s in (64, 383, 384, 768, 1000, 1536, 4096)] == [1, 1, 2, 4, 5, 8, 8]


def test_polar_express_converges_to_the_polar_factor_where_the_quintic_plateaus():
    """Polar Express (arXiv 2505.16932, Algorithm 1) changes its quintic per iteration and converges: after 8 fp32
    iterations every singular value of a Gaussian 64 x 128 matrix (condition ~20) is within 2e-3 of 1 and the
    result within 3e-3 of U V^T, where Keller Jordan's quintic leaves them spread over about [0.7, 1.2]."""
    G = torch.randn(64, 128, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    polar = (U @ Vh).float()
    spreads = {}
    for name in ("quintic", "polar_express"):
        X = zeropower_via_newtonschulz5(G.float(), steps=8, dtype=torch.float32, coefficients=name)
        s = torch.linalg.svdvals(X)
        spreads[name] = float((s - 1).abs().max())
        if name == "polar_express":
            error = float((X - polar).norm() / polar.norm())
            assert error < 3e-3, f"Polar Express is {error:.2e} from U V^T after 8 iterations"
    assert spreads["polar_express"] < 2e-3 and spreads["quintic"] > 0.1, spreads
    schedule, margin = coefficient_schedule("polar_express", 10)
    assert schedule[:7] == list(POLAR_EXPRESS[:7]) and schedule[7:] == [(1.875, -1.25, 0.375)] * 3 and margin == 1.01
    assert POLAR_EXPRESS[0] == pytest.approx((8.28721201814563 / 1.01, -23.595886519098837 / 1.01**3,
                                               17.300387312530933 / 1.01**5))
    with pytest.raises(ValueError, match="ns_coefficients='jordan' is not allowed; it must be 'quintic' or"):
        coefficient_schedule("jordan", 5)
