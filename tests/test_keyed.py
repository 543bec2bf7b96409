"""Keyed draws made on an accelerator (muonq_hf.keyed.keyed_normal) and the orthonormalization it needs without a
host decision (lowrank.orthonormalize_selected), checked on CPU tensors: the functions are device-independent."""

from __future__ import annotations

import pytest
import torch

from muonq_hf.keyed import device_keys, key_of, keyed_normal
from muonq_hf.lowrank import orthonormalize_columns, orthonormalize_selected


def test_keyed_normal_is_a_standard_normal_per_key_and_the_same_on_every_call():
    keys = device_keys(0, ((3,), (3, 1), (4,)), torch.device("cpu"))
    draws = keyed_normal((200, 500), keys)  # (3, 200, 500)
    assert draws.shape == (3, 200, 500) and draws.dtype == torch.float32
    assert torch.equal(draws, keyed_normal((200, 500), keys))  # no generator state: the same draw every time
    assert torch.equal(draws[2], keyed_normal((200, 500), keys[2:])[0])  # a row depends on its own key only
    for row in draws:  # 1e5 values each: mean within 4 standard errors (0.0126), std within 1%
        assert abs(float(row.mean())) < 0.0126, float(row.mean())
        assert abs(float(row.std()) - 1) < 0.01, float(row.std())
        assert float(row.abs().max()) < 6.5  # Box-Muller with u1 >= 2^-33: |z| <= 7.6; 6.5 is 1 in 1e10 per value
    corr = torch.corrcoef(draws.flatten(1))  # three keys, three independent rows
    assert (corr - torch.eye(3)).abs().max() < 0.02, corr
    assert key_of(0, 3) != key_of(0, 3, 1) and key_of(0, 3) != key_of(1, 3)


def test_keyed_normal_refuses_a_draw_its_counter_cannot_address():
    with pytest.raises(ValueError, match=r"at most 2\^31 values per key"):
        keyed_normal((2**16, 2**15), torch.zeros(1, dtype=torch.int64, device="meta"))


def _parts(P: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gram = P.mT @ P
    L, info = torch.linalg.cholesky_ex(gram)
    diag = L.diagonal(dim1=-2, dim2=-1)
    return gram, L, (info == 0) & (diag.amin(dim=-1) ** 2 > 1e-8 * diag.amax(dim=-1) ** 2)


def test_orthonormalize_selected_is_cholesky_qr_where_well_conditioned_and_shrinks_missing_directions():
    gen = torch.Generator().manual_seed(0)
    good = torch.randn(64, 8, generator=gen, dtype=torch.float64)
    deficient = torch.cat([good[:, :5], good[:, :3] @ torch.randn(3, 3, generator=gen, dtype=torch.float64)], 1)
    P = torch.stack([good, deficient, torch.zeros(64, 8, dtype=torch.float64)])  # (3, 64, 8)
    gram, L, fine = _parts(P)
    assert fine.tolist() == [True, False, False]
    Q = orthonormalize_selected(P, gram, L, fine)
    assert torch.equal(Q[0], orthonormalize_columns(P[:1])[0])  # the CPU's Cholesky-QR, bit for bit
    s = torch.linalg.svdvals(Q[1])  # rank 5: five singular values ~1, three ~0 (the CPU drops them exactly)
    assert (s[:5] - 1).abs().max() < 1e-6 and s[5:].max() < 1e-3, s
    span = torch.linalg.svd(good[:, :5], full_matrices=False)[0]  # Q[1] stays in P's column space
    assert (Q[1] - span @ (span.mT @ Q[1])).abs().max() < 1e-10
    assert Q[2].abs().max() == 0  # a zero P: zero columns, as on CPU
