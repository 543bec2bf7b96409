"""MuonQ against independent references written here: plain fp32 Muon, fp32 MuonQ (docs/design.md, "The MuonQ step") and
torch's AdamW; fused-QKV splitting; conv kernels; non-finite gradients; option validation."""

import copy
import math

import pytest
import torch
from torch import nn

from muonq_hf import MuonQ
from muonq_hf.codecs import dequantize

# plain Muon, with Newton-Schulz in fp32 to compare with the fp32 reference at fp32 tolerances
PLAIN_MUON = dict(bits=32, normalize=False, rank_divisor=0, mu=0.0, ns_dtype="fp32")


# ------------------------------------------------------------------------------------ references (fp32)
def ns5_reference(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Keller Jordan's zeropower_via_newtonschulz5, in fp32, for one matrix."""
    a, b, c = (3.4445, -4.7750, 2.0315)
    X = G.clone()
    if G.size(0) > G.size(1):
        X = X.T
    X = X / (X.norm() + 1e-7)
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if G.size(0) > G.size(1) else X


class ReferenceMuon:
    """Plain Muon (docs/design.md): M = beta M + G; U = NS5(M) (or NS5(G + beta M)); W *= 1 - lr wd;
    W -= lr 0.2 sqrt(max) U."""

    def __init__(self, lr, beta=0.95, wd=0.0, nesterov=False):
        self.lr, self.beta, self.wd, self.nesterov, self.buf = lr, beta, wd, nesterov, {}

    def step(self, W: torch.Tensor, G: torch.Tensor, key) -> None:
        G2 = G.reshape(G.size(0), -1)
        M = self.buf.setdefault(key, torch.zeros_like(G2))
        M.mul_(self.beta).add_(G2)
        U = ns5_reference(G2 + self.beta * M if self.nesterov else M)
        W.mul_(1 - self.lr * self.wd)
        W.add_(U.reshape(W.shape), alpha=-self.lr * 0.2 * math.sqrt(max(G2.shape)))


class ReferenceMuonQ32:
    """The MuonQ step (docs/design.md) in fp32 with torch.linalg.qr (Householder): normalize G, momentum,
    normalize M, split."""

    def __init__(self, lr, beta=0.95, rank_divisor=16):
        self.lr, self.beta, self.rank_divisor, self.state = lr, beta, rank_divisor, {}

    def step(self, W, G, key, R_init):
        m, n = G.shape
        r = min(m, n) // self.rank_divisor
        res, P, R = self.state.get(key, (torch.zeros(m, n), torch.zeros(m, r), R_init))
        M_prev = res + P @ R.T
        G_hat = G / (G.norm() + 1e-7)
        M = self.beta * M_prev + G_hat
        M_bar = M / (M.norm() + 1e-7)
        Q = R / (R.norm(dim=0, keepdim=True) + 1e-7)
        P = torch.linalg.qr(M_bar @ Q, mode="reduced").Q
        R = M_bar.T @ P
        self.state[key] = (M_bar - P @ R.T, P, R)
        W.add_(ns5_reference(M_bar), alpha=-self.lr * 0.2 * math.sqrt(max(m, n)))


def grads_for(shapes, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g) for s in shapes] for _ in range(steps)]


def run_optimizer(opt, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone().to(p.dtype)
        opt.step()
    return params


# ----------------------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("nesterov", [False, True])
def test_plain_muon_equals_reference_muon(nesterov):
    torch.manual_seed(0)
    shapes = [(32, 48), (48, 32), (16, 4, 3, 3)]  # wide, tall, conv kernel viewed as (16, 36)
    init = [torch.randn(s) for s in shapes]
    grads = grads_for(shapes, 6)
    params = [nn.Parameter(w.clone()) for w in init]
    opt = MuonQ([dict(params=params, use_muon=True)], lr=0.01, weight_decay=0.1, nesterov=nesterov, **PLAIN_MUON)
    run_optimizer(opt, params, grads)
    ref = ReferenceMuon(lr=0.01, wd=0.1, nesterov=nesterov)
    expected = [w.clone() for w in init]
    for step_grads in grads:
        for i, (w, g) in enumerate(zip(expected, step_grads, strict=True)):
            ref.step(w, g, i)
    for p, w in zip(params, expected, strict=True):
        torch.testing.assert_close(p.data, w, atol=2e-6, rtol=1e-5)


def test_default_bf16_newton_schulz_tracks_the_fp32_reference():
    """ns_dtype="bf16" (the default, as torch.optim.Muon runs it) moves the weights like the fp32 reference:
    after 6 steps each weight's change is within 3% of the reference's (measured: 1.7%; bf16 has 8 bits of
    mantissa, 0.4% per rounding, over 5 iterations; the fp32 run is exact to 1e-5, above), and a wrong update
    fails it (the negative control below)."""
    torch.manual_seed(0)
    shapes = [(32, 48), (48, 32)]
    init = [torch.randn(s) for s in shapes]
    grads = grads_for(shapes, 6)
    params = [nn.Parameter(w.clone()) for w in init]
    options = {k: v for k, v in PLAIN_MUON.items() if k != "ns_dtype"}
    opt = MuonQ([dict(params=params, use_muon=True)], lr=0.01, **options)
    assert opt.param_groups[0]["ns_dtype"] == "bf16"
    run_optimizer(opt, params, grads)
    ref = ReferenceMuon(lr=0.01)
    expected = [w.clone() for w in init]
    for step_grads in grads:
        for i, (w, g) in enumerate(zip(expected, step_grads, strict=True)):
            ref.step(w, g, i)
    for i, (p, w, w0) in enumerate(zip(params, expected, init, strict=True)):
        rel = ((p.data - w0) - (w - w0)).norm() / (w - w0).norm()
        assert rel < 0.03, f"parameter {i}: bf16 update off the fp32 reference by {rel:.4f} (allowed 0.03)"
        assert ((p.data - w0) - 0.9 * (w - w0)).norm() / (w - w0).norm() > 0.05  # a 10% smaller step is caught


def test_adamw_groups_equal_torch_adamw():
    torch.manual_seed(0)
    shapes = [(100, 16), (16,)]
    init = [torch.randn(s) for s in shapes]
    grads = grads_for(shapes, 8)
    params = [nn.Parameter(w.clone()) for w in init]
    opt = MuonQ([dict(params=params, use_muon=False)], lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.05)
    run_optimizer(opt, params, grads)
    ref_params = [nn.Parameter(w.clone()) for w in init]
    ref = torch.optim.AdamW(ref_params, lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.05)
    run_optimizer(ref, ref_params, grads)
    for p, q in zip(params, ref_params, strict=True):
        torch.testing.assert_close(p.data, q.data, atol=1e-6, rtol=1e-6)


def test_fp32_muonq_with_split_equals_reference():
    """bits=32 keeps normalize and the low-rank split: the whole MuonQ step (docs/design.md) minus the codec."""
    torch.manual_seed(0)
    W0 = torch.randn(64, 96)
    grads = grads_for([(64, 96)], 6)
    p = nn.Parameter(W0.clone())
    opt = MuonQ([dict(params=[p], use_muon=True)], lr=0.01, bits=32, mu=0.0, ns_dtype="fp32")
    run_optimizer(opt, [p], grads)
    # the first-step Gaussian only picks the subspace; in fp32 the residual makes P R^T + res exact anyway
    ref = ReferenceMuonQ32(lr=0.01)
    W = W0.clone()
    for (g,) in grads:
        ref.step(W, g, 0, torch.randn(96, 4))
    torch.testing.assert_close(p.data, W, atol=1e-5, rtol=1e-5)
    assert opt.state[p]["P"].shape == (64, 4) and opt.state[p]["R"].shape == (1, 96, 4)


def test_default_4bit_state_tracks_the_fp32_momentum():
    """The packed 4-bit state decodes to the fp32 reference's normalized momentum within the codec's error."""
    torch.manual_seed(0)
    W0 = torch.randn(128, 128)
    # gradients with a persistent low-rank signal plus noise, like real training
    signal = torch.randn(128, 4) @ torch.randn(4, 128)
    grads = [[signal + 0.5 * g] for (g,) in grads_for([(128, 128)], 20)]
    p = nn.Parameter(W0.clone())
    opt = MuonQ([dict(params=[p], use_muon=True)], lr=0.01)
    ref = ReferenceMuonQ32(lr=0.01)
    W = W0.clone()
    for (g,) in grads:
        p.grad = g.clone()
        opt.step()
        ref.step(W, g, 0, torch.randn(128, 8))
    st = opt.state[p]
    assert st["res_codes"].dtype == torch.uint8 and st["res_codes"].shape == (128, 64)
    decoded = dequantize(st["res_codes"].unsqueeze(0), st["res_scale"].view(1, 1, 1), 128, 4, 255.0)
    P = dequantize(st["P_codes"].unsqueeze(0), st["P_scale"].unsqueeze(-2), 8, 4, 255.0, "column")
    R = dequantize(st["R_codes"], st["R_scale"].unsqueeze(-2), 8, 4, 255.0, "column")
    M_q = (decoded + P @ R.mT)[0]
    res, P_ref, R_ref = ref.state[0]
    M_ref = res + P_ref @ R_ref.T
    cos = (M_q * M_ref).sum() / (M_q.norm() * M_ref.norm())
    # one 4-bit encode has ~15% relative error (cos ~0.99, see test_codecs); errors of past steps decay with
    # the effective momentum (~0.65 after normalization), so the stored state sits at cos ~0.95 (measured)
    assert cos > 0.93
    delta_q, delta_ref = p.data - W0, W - W0
    assert (delta_q * delta_ref).sum() / (delta_q.norm() * delta_ref.norm()) > 0.97



@pytest.mark.parametrize("layer", ["conv1d", "linear"])
def test_fused_qkv_split_equals_three_separate_matrices(layer):
    """GPT-2's Conv1D c_attn (d, 3d) splits along columns, a Linear qkv (3d, d) along rows."""
    torch.manual_seed(0)
    d = 24
    shape, dim = ((d, 3 * d), 1) if layer == "conv1d" else ((3 * d, d), 0)
    W0 = torch.randn(shape)
    grads = grads_for([shape], 5)
    fused = nn.Parameter(W0.clone())
    opt = MuonQ([dict(params=[fused], use_muon=True, qkv_split=3, split_dim=dim)], lr=0.01, bits=32, mu=0.0,
                rank_divisor=4)
    run_optimizer(opt, [fused], grads)
    pieces = [nn.Parameter(w.clone()) for w in W0.chunk(3, dim=dim)]
    opt_pieces = MuonQ([dict(params=pieces, use_muon=True)], lr=0.01, bits=32, mu=0.0, rank_divisor=4)
    run_optimizer(opt_pieces, pieces, [[g.chunk(3, dim=dim)[i] for i in range(3)] for (g,) in grads])
    torch.testing.assert_close(fused.data, torch.cat([p.data for p in pieces], dim=dim), atol=1e-5, rtol=1e-5)
    # row layout: the state rows are the parameter rows, so a row shard of W owns a row shard of the codes
    assert opt.state[fused]["res"].shape[0] == shape[0]


def test_fused_qkv_4bit_differs_from_unsplit():
    """The split is not cosmetic: per-piece normalization and scales change the quantized update."""
    torch.manual_seed(0)
    W0 = torch.randn(24, 72)
    grads = grads_for([(24, 72)], 3)
    grads = [[g * torch.tensor([1.0, 10.0, 0.1]).repeat_interleave(24)] for (g,) in grads]
    a, b = nn.Parameter(W0.clone()), nn.Parameter(W0.clone())
    run_optimizer(MuonQ([dict(params=[a], use_muon=True, qkv_split=3, split_dim=1)], lr=0.01), [a], grads)
    run_optimizer(MuonQ([dict(params=[b], use_muon=True)], lr=0.01), [b], grads)
    assert not torch.allclose(a.data, b.data, atol=1e-4)


def test_rank_divisor_too_large_falls_back_to_no_split():
    p = nn.Parameter(torch.randn(8, 64))
    opt = MuonQ([dict(params=[p], use_muon=True)], lr=0.01)  # min(8, 64) // 16 == 0
    p.grad = torch.randn(8, 64)
    opt.step()
    assert "P_codes" not in opt.state[p] and opt.state[p]["res_codes"].shape == (8, 32)


# --------------------------------------------------------------------------------------- bad inputs
def test_nonfinite_gradient_raises_before_touching_anything():
    a, b = nn.Parameter(torch.randn(16, 16)), nn.Parameter(torch.randn(16))
    opt = MuonQ([dict(params=[a], use_muon=True), dict(params=[b])], lr=0.01)
    a.grad, b.grad = torch.randn(16, 16), torch.randn(16)
    opt.step()
    before = (a.data.clone(), b.data.clone(), copy.deepcopy(opt.state_dict()))
    a.grad = torch.randn(16, 16)
    b.grad = torch.full((16,), float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite gradient"):
        opt.step()
    assert torch.equal(a.data, before[0]) and torch.equal(b.data, before[1])
    after = opt.state_dict()["state"]
    for i, st in before[2]["state"].items():
        for k, v in st.items():
            assert torch.equal(after[i][k], v)


def test_nonfinite_gradient_skip_mode_counts_and_skips():
    a = nn.Parameter(torch.randn(16, 16))
    opt = MuonQ([dict(params=[a], use_muon=True)], lr=0.01, nonfinite="skip")
    a.grad = torch.full((16, 16), float("inf"))
    w = a.data.clone()
    opt.step()
    assert opt.skipped_steps == 1 and torch.equal(a.data, w) and not opt.state[a]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(bits=3), "bits=3 is not allowed; bits must be one of 4, 8, 32"),
        (dict(lr=-0.1), "lr=-0.1 is not allowed"),
        (dict(adamw_bits=4), "adamw_bits=4 is not allowed; adamw_bits must be 8 or 32"),
        (dict(rank_divisor=-1), "rank_divisor=-1"),
        (dict(rank_divisor=2.5), "rank_divisor=2.5"),
        (dict(mu=-1.0), "mu=-1.0"),
        (dict(block_size=0), "block_size=0"),
        (dict(momentum=1.0), "momentum=1.0"),
        (dict(split_dim=2), "split_dim=2"),
        (dict(betas=(0.9, 1.5)), "betas"),
    ],
)
def test_bad_options_are_rejected_with_their_value(kwargs, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
        MuonQ([nn.Parameter(torch.randn(4, 4))], **kwargs)


def test_unknown_option_and_group_key_are_rejected():
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['rank'\]; allowed: .*rank_divisor"):
        MuonQ([nn.Parameter(torch.randn(4, 4))], rank=4)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['use_muonq'\]"):
        MuonQ([dict(params=[nn.Parameter(torch.randn(4, 4))], use_muonq=True)])
    with pytest.raises(ValueError, match="nonfinite must be 'error' or 'skip', got 'ignore'"):
        MuonQ([nn.Parameter(torch.randn(4, 4))], nonfinite="ignore")


def test_muon_group_rejects_vectors_and_bad_qkv_split():
    with pytest.raises(ValueError, match=r"use_muon=True needs tensors of >= 2 dims, got shape \(8,\)"):
        MuonQ([dict(params=[nn.Parameter(torch.randn(8))], use_muon=True)])
    p = nn.Parameter(torch.randn(10, 10))
    with pytest.raises(ValueError, match=r"qkv_split=3 does not divide dim 0 \(size 10\)"):  # at construction
        MuonQ([dict(params=[p], use_muon=True, qkv_split=3)])


def test_adamw_lr_sets_the_adamw_groups_lr_only():
    a, b = nn.Parameter(torch.randn(8, 8)), nn.Parameter(torch.randn(8))
    opt = MuonQ([dict(params=[a], use_muon=True), dict(params=[b])], lr=0.02, adamw_lr=3e-4)
    assert opt.param_groups[0]["lr"] == 0.02 and opt.param_groups[1]["lr"] == 3e-4


def test_adamw_8bit_tracks_fp32_adamw_and_stores_uint8():
    torch.manual_seed(0)
    init = torch.randn(64, 128)
    grads = grads_for([(64, 128)], 10)
    p8, p32 = nn.Parameter(init.clone()), nn.Parameter(init.clone())
    opt8 = MuonQ([dict(params=[p8])], lr=1e-2, adamw_bits=8)
    run_optimizer(opt8, [p8], grads)
    run_optimizer(MuonQ([dict(params=[p32])], lr=1e-2), [p32], grads)
    st = opt8.state[p8]
    assert st["exp_avg_codes"].dtype == torch.uint8 and st["exp_avg_absmax"].shape == (64, 1)
    d8, d32 = p8.data - init, p32.data - init
    assert (d8 - d32).norm() < 0.05 * d32.norm()


@pytest.mark.parametrize("adamw_bits", [8, 32])
def test_adamw_in_row_chunks_is_bit_identical_to_one_chunk(monkeypatch, adamw_bits):
    """The AdamW step runs chunk by chunk of rows (bounded transient memory); 8-bit moments are decoded and
    encoded per chunk. The codec's blocks run along rows, so any chunking gives the codes, scales, moments and
    weights of the whole tensor at once."""
    import muonq_hf.adamw as adamw

    torch.manual_seed(0)
    init = torch.randn(40, 600)  # 3 blocks of 256 per row (the last one partial)
    grads = grads_for([(40, 600)], 4)
    results = []
    for chunk in (10**9, 7 * 600, 600):  # one chunk, 6 chunks of 7 rows (the last of 5), 40 chunks of 1 row
        monkeypatch.setattr(adamw, "CHUNK_ELEMENTS", chunk)
        p = nn.Parameter(init.clone())
        opt = MuonQ([dict(params=[p])], lr=1e-2, adamw_bits=adamw_bits, weight_decay=0.1)
        run_optimizer(opt, [p], grads)
        results.append((p.data.clone(), {k: v.clone() for k, v in opt.state[p].items()}))
    (w0, s0), *others = results
    assert not torch.equal(w0, init)
    for w, s in others:
        assert torch.equal(w, w0), (w - w0).abs().max()
        assert s.keys() == s0.keys() and all(torch.equal(s[k], s0[k]) for k in s0), [
            k for k in s0 if not torch.equal(s[k], s0[k])]


def test_8bit_moments_start_as_the_codes_of_zero():
    """The first step fills the 8-bit state directly (no fp32 zeros to quantize): the same codes and absmax as
    quantizing zeros, for both moments, a width that is not a multiple of the block and one below it."""
    from muonq_hf.adamw import zero_moment
    from muonq_hf.codecs import quantize_dynamic8
    from muonq_hf.state import ADAMW_8BIT_BLOCK, moment_codebook

    for key in ("exp_avg", "exp_avg_sq"):
        for rows, cols in ((3, 600), (5, 17)):
            codes, absmax = zero_moment(key, rows, cols, torch.device("cpu"))
            ref_codes, ref_absmax = quantize_dynamic8(torch.zeros(rows, cols), moment_codebook(key, "cpu"),
                                                      ADAMW_8BIT_BLOCK)
            assert codes.dtype == ref_codes.dtype and torch.equal(codes, ref_codes), (key, rows, cols)
            assert absmax.dtype == ref_absmax.dtype and torch.equal(absmax, ref_absmax), (key, rows, cols)


def test_adamw_steps_scalars_vectors_and_non_contiguous_weights_like_torch():
    """0-dim and 1-D parameters (viewed as rows) and a transposed, non-contiguous weight (one chunk) take
    torch's AdamW step exactly (fp32 moments)."""
    torch.manual_seed(0)
    shapes_and_views = [((), None), ((7,), None), ((12, 5), "t")]
    for shape, view in shapes_and_views:
        init = torch.randn(shape[::-1] if view else shape)
        ours = nn.Parameter(init.clone().t() if view else init.clone())
        ref = nn.Parameter(init.clone().t() if view else init.clone())
        opt = MuonQ([dict(params=[ours])], lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.05)
        ref_opt = torch.optim.AdamW([ref], lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.05)
        for step in range(3):
            g = torch.randn(ours.shape, generator=torch.Generator().manual_seed(step))
            ours.grad, ref.grad = g.clone(), g.clone()
            opt.step()
            ref_opt.step()
        torch.testing.assert_close(ours.data, ref.data, atol=1e-7, rtol=1e-6, msg=f"shape {shape} view {view}")


def test_adamw_8bit_on_a_non_contiguous_weight_equals_the_contiguous_one():
    """A transposed (non-contiguous) weight is stepped through a contiguous copy: its 8-bit codes and weights
    equal those of the same values held contiguously, bit for bit."""
    torch.manual_seed(0)
    init = torch.randn(128, 64)
    strided, plain = nn.Parameter(init.clone().t()), nn.Parameter(init.t().contiguous())  # (64, 128) each
    assert not strided.is_contiguous()
    opts = [MuonQ([dict(params=[q])], lr=1e-2, adamw_bits=8) for q in (strided, plain)]
    for step in range(3):
        g = torch.randn(64, 128, generator=torch.Generator().manual_seed(step))
        for q, opt in zip((strided, plain), opts, strict=True):
            q.grad = g.clone()
            opt.step()
    assert torch.equal(strided.data, plain.data), (strided.data - plain.data).abs().max()
    assert all(torch.equal(opts[0].state[strided][k], opts[1].state[plain][k]) for k in opts[1].state[plain])
