"""Matrix plans: experts x pieces, each its own Muon matrix (flat spectrum, own scale, own state)."""

import io

import pytest
import torch
from torch import nn

from muonq_hf import MuonQ, state_bytes
from muonq_hf.matrices import MatrixPlan, plan_of
from muonq_hf.memory import expected_state_bytes
from muonq_hf.options import DEFAULTS
from muonq_hf.orthogonalize import muon_scale
from muonq_hf.state import QuantizedMomentum

# (parameter shape, plan keys): the layouts of transformers' models
LAYOUTS = {
    "mixtral_gate_up": ((4, 96, 40), dict(experts=True, qkv_split=2, split_dim=0)),  # (E, 2I, H), halves of rows
    "gpt_oss_gate_up": ((3, 40, 96), dict(experts=True, qkv_split=2, split_dim=1, interleave=True)),  # (E, H, 2I)
    "llama4_gate_up": ((2, 40, 96), dict(experts=True, qkv_split=2, split_dim=1)),  # (E, H, 2I), column halves
    "experts_down": ((4, 40, 48), dict(experts=True)),
    "phi3_qkv_gqa": ((64 + 2 * 16, 64), dict(piece_sizes=[64, 16, 16], split_dim=0)),
    "phi3_gate_up": ((2 * 80, 48), dict(qkv_split=2, split_dim=0)),
    "grouped_conv": ((48, 8, 3), dict(experts=2)),  # Conv1d(16, 48, 3, groups=2): 2 matrices (24, 24)
}


def full_group(**keys) -> dict:
    return {**DEFAULTS, "use_muon": True, **keys}


def known_spectrum(rows: int, cols: int, generator: torch.Generator, condition: float = 100.0) -> torch.Tensor:
    """U diag(s) V^T with s log-spaced from `condition` down to 1."""
    k = min(rows, cols)
    U, _ = torch.linalg.qr(torch.randn(rows, k, generator=generator))
    V, _ = torch.linalg.qr(torch.randn(cols, k, generator=generator))
    s = torch.logspace(torch.log10(torch.tensor(condition)).item(), 0, k)
    return U @ torch.diag(s) @ V.T


def planted_gradient(plan: MatrixPlan, shape, generator) -> torch.Tensor:
    """A gradient whose every expert x piece has a known spectrum of condition number 100."""
    G = torch.empty(plan.experts, plan.m, plan.n)
    for b, pieces in enumerate(plan.batches):
        rows, cols = plan.batch_shape(b)
        values = torch.stack([known_spectrum(rows, cols, generator) for _ in range(plan.experts * len(pieces))])
        plan.put(G, b, values)
    return G.reshape(shape)


def test_plan_pieces_cover_the_matrix_once():
    for shape, keys in LAYOUTS.values():
        plan = plan_of(torch.empty(shape), full_group(**keys))
        x = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)
        X = plan.view(x)
        out = torch.zeros_like(X)
        for b in range(len(plan.batches)):
            out_b = plan.take(X, b)
            assert out_b.shape == (plan.matrices()[b][0], *plan.batch_shape(b))
            plan.put(out, b, out_b)
        assert torch.equal(out, X), keys
    plan = plan_of(torch.empty(3, 4, 6), full_group(experts=True, qkv_split=2, split_dim=1, interleave=True))
    gate = plan.take(plan.view(torch.arange(72.0).reshape(3, 4, 6)), 0)[0::2]  # expert e, piece 0 (gate)
    assert torch.equal(gate[0], torch.arange(72.0).reshape(3, 4, 6)[0, :, 0::2])  # GPT-OSS: gate = [..., ::2]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_each_expert_and_piece_gets_a_flat_spectrum_and_its_own_scale(layout):
    """One default MuonQ step on gradients of condition number 100: every expert x piece's update has
    singular values within NS5's band (condition < 2.5) and an RMS of 0.2 lr (Moonlight's scale of its shape)."""
    shape, keys = LAYOUTS[layout]
    generator = torch.Generator().manual_seed(0)
    p = nn.Parameter(torch.zeros(shape))
    lr = 0.01
    opt = MuonQ([dict(params=[p], use_muon=True, **keys)], lr=lr)
    plan = plan_of(p, opt.param_groups[0])
    p.grad = planted_gradient(plan, shape, generator)
    opt.step()
    update = plan.view(-p.detach()) / lr
    for b in range(len(plan.batches)):
        rows, cols = plan.batch_shape(b)
        for i, U in enumerate(plan.take(update, b)):
            sv = torch.linalg.svdvals(U.double())
            cond = float(sv[0] / sv[-1])
            rms = float(U.pow(2).mean().sqrt())
            assert cond < 2.5, f"{layout}: matrix {i} of batch {b} ({rows}x{cols}) has condition number {cond:.2f}"
            assert 0.13 < rms < 0.27, f"{layout}: matrix {i} of batch {b} has update RMS {rms:.3f}, expected ~0.2"
            assert sv[0] < 1.25 * muon_scale(rows, cols), f"{layout}: top singular value {float(sv[0]):.3f}"


def test_whole_tensor_view_would_not_be_muon():
    """The defect this plan fixes: (E, out*in) as one matrix gives each expert ~ its raw gradient direction."""
    generator = torch.Generator().manual_seed(1)
    G = torch.stack([known_spectrum(24, 16, generator) for _ in range(4)])  # (E, out, in)
    whole, per_expert = nn.Parameter(torch.zeros(4, 24, 16)), nn.Parameter(torch.zeros(4, 24, 16))
    for p, keys in ((whole, {}), (per_expert, dict(experts=True))):
        opt = MuonQ([dict(params=[p], use_muon=True, **keys)], lr=1.0, bits=32)
        p.grad = G.clone()
        opt.step()
    conds = [float(torch.linalg.cond(-whole.detach()[e].double())) for e in range(4)]
    assert min(conds) > 20, conds  # whole-tensor view: per-expert update keeps the gradient's spread
    assert max(float(torch.linalg.cond(-per_expert.detach()[e].double())) for e in range(4)) < 2.5


@pytest.mark.parametrize("layout", ["mixtral_gate_up", "gpt_oss_gate_up", "phi3_qkv_gqa"])
def test_per_expert_state_equals_separate_2d_parameters(layout):
    """Each expert x piece holds the state a separate 2-D parameter of that shape would hold (bit for bit,
    rank split off so that no first-step Gaussian is involved) over three steps."""
    shape, keys = LAYOUTS[layout]
    generator = torch.Generator().manual_seed(2)
    fused = nn.Parameter(torch.randn(shape, generator=generator))
    opt = MuonQ([dict(params=[fused], use_muon=True, **keys)], lr=0.01, rank_divisor=0)
    plan = plan_of(fused, opt.param_groups[0])
    separate = [
        nn.Parameter(piece.clone())
        for b in range(len(plan.batches)) for piece in plan.take(plan.view(fused.detach()), b)
    ]
    opt_sep = MuonQ([dict(params=separate, use_muon=True)], lr=0.01, rank_divisor=0)
    for _ in range(3):
        G = torch.randn(shape, generator=generator)
        fused.grad = G
        pieces = [piece for b in range(len(plan.batches)) for piece in plan.take(plan.view(G), b)]
        for p, g in zip(separate, pieces, strict=True):
            p.grad = g.clone()
        opt.step()
        opt_sep.step()
    merged = [piece for b in range(len(plan.batches)) for piece in plan.take(plan.view(fused.detach()), b)]
    for i, (a, b) in enumerate(zip(merged, separate, strict=True)):
        diff = float((a - b.detach()).abs().max())
        assert diff <= 1e-6, f"{layout}: matrix {i} differs from its separate 2-D twin by {diff}"
    momentum = QuantizedMomentum(plan, opt.param_groups[0]).dequantized(opt.state[fused])
    pieces = [piece for b in range(len(plan.batches)) for piece in plan.take(momentum, b)]
    for i, (m, p) in enumerate(zip(pieces, separate, strict=True)):
        state = opt_sep.state[p]
        codes = state["res_codes"]
        ref = QuantizedMomentum(plan_of(p, opt_sep.param_groups[0]), opt_sep.param_groups[0]).dequantized(state)[0]
        assert torch.equal(m, ref), f"{layout}: dequantized momentum of matrix {i} differs ({codes.shape})"


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("options", [dict(), dict(bits=8, block_size=16), dict(bits=32), dict(store_norm=True)])
def test_expected_state_bytes_equals_the_stepped_state(layout, options):
    shape, keys = LAYOUTS[layout]
    p = nn.Parameter(torch.randn(shape))
    opt = MuonQ([dict(params=[p], use_muon=True, **keys)], lr=0.01, **options)
    p.grad = torch.randn(shape)
    opt.step()
    assert state_bytes(opt)["total"] == expected_state_bytes(shape, opt.param_groups[0]), (layout, options)


@pytest.mark.parametrize("layout", ["mixtral_gate_up", "gpt_oss_gate_up", "phi3_qkv_gqa", "grouped_conv"])
def test_resume_is_bit_exact_and_state_is_plain_tensors(layout):
    shape, keys = LAYOUTS[layout]
    generator = torch.Generator().manual_seed(3)
    grads = [torch.randn(shape, generator=generator) for _ in range(5)]

    def run(p, opt, steps):
        for g in steps:
            p.grad = g.clone()
            opt.step()

    w0 = torch.randn(shape, generator=generator)
    p = nn.Parameter(w0.clone())
    opt = MuonQ([dict(params=[p], use_muon=True, **keys)], lr=0.01, rank_divisor=8)
    run(p, opt, grads)
    q = nn.Parameter(w0.clone())
    opt_q = MuonQ([dict(params=[q], use_muon=True, **keys)], lr=0.01, rank_divisor=8)
    run(q, opt_q, grads[:2])
    buf = io.BytesIO()
    torch.save({"w": q.detach(), "opt": opt_q.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    r = nn.Parameter(saved["w"].clone())
    opt_r = MuonQ([dict(params=[r], use_muon=True, **keys)], lr=0.01, rank_divisor=8)
    opt_r.load_state_dict(saved["opt"])
    run(r, opt_r, grads[2:])
    assert torch.equal(r.detach(), p.detach()), f"{layout}: resumed weights differ by {(r - p).abs().max()}"
    state = opt.state[p]
    lead = shape[0] if keys.get("experts") is True else None
    if lead is not None:  # every entry of an expert tensor is sharded on the expert dim, like the weight
        assert all(v.shape[0] == lead for k, v in state.items() if k != "step"), {k: v.shape for k, v in state.items()}


def test_bad_plans_are_refused_with_the_shape_named():
    with pytest.raises(ValueError, match=r"pieces \[10, 10\] must be positive and add up to dim 0 .* \(24\)"):
        MuonQ([dict(params=[nn.Parameter(torch.randn(24, 8))], use_muon=True, piece_sizes=[10, 10])])
    with pytest.raises(ValueError, match="interleaved pieces must have equal sizes and cut the columns"):
        MuonQ([dict(params=[nn.Parameter(torch.randn(24, 8))], use_muon=True, qkv_split=2, interleave=True)])
    with pytest.raises(ValueError, match=r"experts=True needs a tensor of >= 3 dims .* got shape \(24, 8\)"):
        MuonQ([dict(params=[nn.Parameter(torch.randn(24, 8))], use_muon=True, experts=True)])
    with pytest.raises(ValueError, match=r"piece_sizes=\[0, 24\] is not allowed"):
        MuonQ([dict(params=[nn.Parameter(torch.randn(24, 8))], use_muon=True, piece_sizes=[0, 24])])
    with pytest.raises(ValueError, match=r"experts=5 groups do not divide dim 0"):
        MuonQ([dict(params=[nn.Parameter(torch.randn(24, 8))], use_muon=True, experts=5)])
