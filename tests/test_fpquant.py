"""round_to_format against torch's own casts, stochastic rounding, and the quantized optimizers.

What torch (2.13, CPU) does on a float32 -> low-precision cast, which the presets reproduce:
- bfloat16, float16, float8_e5m2: IEEE round-to-nearest-even, overflow to +-inf (a value at or beyond
  max + ulp/2 becomes inf), gradual underflow through subnormals.
- float8_e4m3fn: round-to-nearest-even, no inf; overflow *saturates* to +-448, inf inputs included
  (``test_torch_e4m3fn_cast_saturates`` pins this down), NaN stays NaN. Hence the "e4m3" preset is
  FloatFormat(4, 3, finite_only=True) with saturation.
"""

from __future__ import annotations

import math

import pytest
import torch

from fplab.fpquant import (
    FORMATS,
    FloatFormat,
    QuantizedAdam,
    QuantizedMuon,
    as_format,
    horizon_formats,
    horizon_mantissa_bits,
    quantize,
    round_to_format,
)
from muonq_hf.orthogonalize import muon_scale, zeropower_via_newtonschulz5

TORCH_DTYPES = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "e4m3": torch.float8_e4m3fn,
    "e5m2": torch.float8_e5m2,
    "fp32": torch.float32,
}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise bit equality of fp32 tensors (so -0 != +0), any NaN equal to any NaN."""
    return (a.view(torch.int32) == b.view(torch.int32)) | (a.isnan() & b.isnan())


def probe_values(fmt: FloatFormat, n: int = 40_000, seed: int = 0) -> torch.Tensor:
    """Random fp32 bit patterns (every exponent, NaN, inf), log-uniform values spanning the format's
    subnormal..overflow range, exact midpoints between neighbours (ties), and edge cases."""
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(-(2**31), 2**31 - 1, (n,), generator=g, dtype=torch.int64).to(torch.int32)
    patterns = bits.view(torch.float32)
    lo, hi = fmt.emin - fmt.man_bits - 2, fmt.emax + 2
    signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    mags = torch.exp2(torch.empty(n).uniform_(lo, hi, generator=g)) * signs
    # Normal-range ties: keep the format's mantissa bits, set the next bit, clear the rest.
    drop = 23 - fmt.man_bits
    if drop > 0:
        tie_bits = (mags.view(torch.int32) >> drop << drop) | (1 << (drop - 1))
        ties = tie_bits.view(torch.float32)
    else:
        ties = mags
    # Subnormal-range ties: (k + 1/2) * min_subnormal, k < 2^(M+1) (into the first normal binade).
    k = torch.randint(0, 2 ** (fmt.man_bits + 1), (4096,), generator=g).float()
    sub_ties = torch.cat([(k + 0.5) * fmt.min_subnormal, -(k + 0.5) * fmt.min_subnormal])
    m = fmt.max_value
    ulp_top = 2.0 ** (fmt.emax - fmt.man_bits)
    edges = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, m, -m, m + ulp_top / 2, m + ulp_top / 4,
                          -(m + ulp_top / 2), m * 1.5, 1e38, fmt.min_normal, fmt.min_subnormal,
                          fmt.min_subnormal / 2, fmt.min_subnormal * 0.75, -fmt.min_subnormal / 2])
    return torch.cat([patterns, mags.float(), ties, sub_ties, edges.float()])


@pytest.mark.parametrize("name", list(TORCH_DTYPES))
def test_nearest_is_bit_exact_with_torch_casts(name: str) -> None:
    fmt = FORMATS[name]
    x = probe_values(fmt)
    ref = x.to(TORCH_DTYPES[name]).float()
    got = quantize(x, name)  # the preset's own overflow mode: inf, or saturate for e4m3
    bad = ~same_bits(got, ref)
    detail = f"x={x[bad][:4]} torch={ref[bad][:4]} ours={got[bad][:4]}"
    assert not bad.any(), f"{name}: {int(bad.sum())} mismatches, e.g. {detail}"


def test_torch_e4m3fn_cast_saturates() -> None:
    x = torch.tensor([448.0, 464.0, 470.0, 1e4, math.inf, -math.inf, -1e30, math.nan])
    y = x.to(torch.float8_e4m3fn).float()
    assert y[:-1].tolist() == [448.0, 448.0, 448.0, 448.0, 448.0, -448.0, -448.0]
    assert y[-1].isnan()


def test_format_constants_match_torch_finfo() -> None:
    for name, dtype in TORCH_DTYPES.items():
        fmt, info = FORMATS[name], torch.finfo(dtype)
        assert fmt.max_value == info.max, name
        assert fmt.min_normal == info.smallest_normal, name
        assert fmt.min_subnormal == 2.0 ** (math.log2(info.smallest_normal) - fmt.man_bits), name
    assert FloatFormat(4, 3).max_value == 240.0  # IEEE-style e4m3 (with inf) differs from e4m3fn


def test_identity_cases_and_overflow_modes() -> None:
    x = torch.randn(1000) * 1e3
    assert torch.equal(round_to_format(x, 8, 23), x)  # e8m23 is fp32
    assert quantize(x, None) is x
    big = torch.tensor([70000.0, -1e6, math.inf])
    assert round_to_format(big, 5, 10, overflow="inf").tolist() == [math.inf, -math.inf, math.inf]
    assert round_to_format(big, 5, 10, overflow="saturate").tolist() == [65504.0, -65504.0, 65504.0]
    x64 = torch.tensor([1 + 2**-9, 3.0e-8], dtype=torch.float64)  # fp64 inputs work too
    assert torch.equal(round_to_format(x64, 8, 7), x64.float().to(torch.bfloat16).double())


@pytest.mark.parametrize(
    "exp_bits,man_bits,scale", [(8, 1, 1.0), (8, 3, 1e-3), (5, 2, 2.0**-16), (4, 3, 100.0)]
)
def test_stochastic_rounding_is_unbiased(exp_bits: int, man_bits: int, scale: float) -> None:
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(64, generator=g) + 0.1) * scale  # includes e5m2 subnormals at scale 2^-16
    draws = 20_000
    y = round_to_format(x.repeat(draws, 1), exp_bits, man_bits, "stochastic", "saturate", g,
                        finite_only=(exp_bits, man_bits) == (4, 3))
    nearest = round_to_format(x, exp_bits, man_bits, "nearest", "saturate")
    # ulp of x in the format (subnormals share the smallest normal binade's spacing)
    emin = 2 - 2 ** (exp_bits - 1)
    gap = 2.0 ** (torch.floor(torch.log2(x)).clamp(min=emin) - man_bits)
    lo = torch.where(nearest > x, nearest - gap, nearest)
    assert ((y == lo) | (y == lo + gap)).all()  # every draw is one of x's two neighbours
    # Unbiased: a draw is lo or lo + ulp with P(up) = frac, so its std is <= ulp / 2 and the mean of
    # `draws` draws is within 5 standard errors (p ~ 6e-7 per element, ~4e-5 for all 64).
    err = (y.double().mean(0) - x.double()).abs()
    tol = 5 * (gap.double() / 2) / math.sqrt(draws)
    assert (err <= tol).all(), (err / tol).max()
    # ...and nearest rounding of the same values is visibly biased somewhere (the test has power).
    assert ((nearest.double() - x.double()).abs() > tol).any()


def test_stochastic_rounding_is_seeded() -> None:
    x = torch.randn(100)
    a = round_to_format(x, 8, 2, "stochastic", generator=torch.Generator().manual_seed(3))
    b = round_to_format(x, 8, 2, "stochastic", generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: as_format("fp9"), r"'fp9'.*bf16.*e4m3.*fp16"),
        (lambda: as_format(3), r"3.*eXmY"),
        (lambda: round_to_format(torch.ones(2), 9, 3), r"exp_bits.*\[2, 8\].*9"),
        (lambda: round_to_format(torch.ones(2), 8, 24), r"man_bits.*\[0, 23\].*24"),
        (lambda: round_to_format(torch.ones(2), 8, -1), r"man_bits.*-1"),
        (lambda: round_to_format(torch.ones(2), 8, 3, rounding="up"), r"'nearest', 'stochastic'.*'up'"),
        (lambda: round_to_format(torch.ones(2), 8, 3, overflow="wrap"), r"'saturate', 'inf'.*'wrap'"),
        (lambda: round_to_format(torch.ones(2), 4, 3, overflow="inf", finite_only=True), r"no inf.*saturate"),
        (lambda: round_to_format(torch.ones(2, dtype=torch.float16), 5, 2), r"float32 or float64.*float16"),
        (lambda: FloatFormat(1, 3), r"exp_bits.*1"),
        (lambda: horizon_mantissa_bits(100, "sgd", "G"), r"'adam', 'muon'.*'sgd'"),
        (lambda: horizon_mantissa_bits(100, "muon", "V"), r"\['G', 'M', 'W'\].*'V'"),
        (lambda: horizon_mantissa_bits(0, "adam", "G"), r"horizon.*0"),
        (lambda: horizon_formats(100, "lion"), r"'lion'"),
        (lambda: QuantizedAdam([torch.zeros(2, requires_grad=True)], rounding="floor"), r"'floor'"),
        (lambda: QuantizedMuon([torch.zeros(2, requires_grad=True)], m="e8m99"), r"man_bits.*99"),
    ],
)
def test_user_errors_are_clear_value_errors(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_format_parsing() -> None:
    assert as_format("bf16") == FloatFormat(8, 7)
    assert as_format("e8m3") == FloatFormat(8, 3)
    assert as_format("e4m3fn") == FORMATS["e4m3"]
    assert as_format((5, 2)) == FORMATS["e5m2"]
    assert as_format(None) is None


def test_horizon_rule() -> None:
    T = 1024  # log2 T = 10
    bits = {c: f.man_bits for c, f in horizon_formats(T, "adam").items()}
    assert bits == {"G": 10, "M": 10, "W": 20, "V": 20}
    assert {c: f.man_bits for c, f in horizon_formats(T, "muon").items()} == {"G": 5, "M": 5, "W": 5}
    assert horizon_mantissa_bits(10**6, "adam", "W") == 23  # clipped to fp32
    assert horizon_mantissa_bits(1, "muon", "G", offset=-3) == 1
    opt = QuantizedAdam([torch.zeros(3, requires_grad=True)], horizon=T, w="bf16")
    assert opt.formats == {"G": FloatFormat(8, 10), "W": FloatFormat(8, 7), "M": FloatFormat(8, 10),
                           "V": FloatFormat(8, 20)}


# --- optimizers reduce to the exact ones -------------------------------------------------------------


def toy_problem(seed: int = 0) -> tuple[list[torch.Tensor], callable]:
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(6, 5, generator=g), torch.randn(6, generator=g), torch.randn(2, 3, 4, generator=g)]
    xs = [torch.randn(5, generator=g) for _ in range(40)]

    def loss(ps: list[torch.Tensor], t: int) -> torch.Tensor:
        W, b, T3 = ps
        return (torch.tanh(W @ xs[t] + b) ** 2).sum() + (T3.sin() * xs[t][:4]).sum() + 0.1 * (W**2).sum()

    return params, loss


def train(opt_factory, steps: int = 30) -> list[torch.Tensor]:
    init, loss = toy_problem()
    params = [p.clone().requires_grad_() for p in init]
    opt = opt_factory(params)
    for t in range(steps):
        opt.zero_grad()
        loss(params, t).backward()
        opt.step()
    return [p.detach() for p in params]


@pytest.mark.parametrize("fmt", [None, "fp32", (8, 23)])
def test_quantized_adam_is_torch_adam_at_full_precision(fmt) -> None:
    ref = train(lambda ps: torch.optim.Adam(ps, lr=3e-2, betas=(0.8, 0.99), eps=1e-6, foreach=False))
    fmts = dict(g=fmt, w=fmt, m=fmt, v=fmt)
    got = train(lambda ps: QuantizedAdam(ps, lr=3e-2, betas=(0.8, 0.99), eps=1e-6, **fmts))
    for a, b in zip(ref, got, strict=True):
        assert torch.equal(a, b)


class ReferenceMuon(torch.optim.Optimizer):
    """docs/design.md, "Plain Muon" without weight decay: M = beta M + G; W -= lr 0.2 sqrt(max(m, n)) NS5(M), with a
    1-D tensor as a (1, n) row and a 3-D tensor as a batch of matrices."""

    def __init__(self, params, lr: float, momentum: float = 0.95) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                buf = self.state[p].setdefault("buf", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(p.grad)
                mat = buf.view(1, -1) if p.ndim == 1 else buf
                U = zeropower_via_newtonschulz5(mat, dtype=torch.float32)
                p.add_(U.view_as(p), alpha=-group["lr"] * muon_scale(mat.size(-2), mat.size(-1)))


@pytest.mark.parametrize("fmt", [None, "fp32"])
def test_quantized_muon_is_exact_muon_at_full_precision(fmt) -> None:
    ref = train(lambda ps: ReferenceMuon(ps, lr=0.02))
    got = train(lambda ps: QuantizedMuon(ps, lr=0.02, g=fmt, w=fmt, m=fmt))
    for a, b in zip(ref, got, strict=True):
        assert torch.equal(a, b)


def test_muon_treats_a_vector_as_a_row() -> None:
    # The polar factor of a (1, n) row is its direction: the step is along -M / ||M||.
    p = torch.zeros(8, requires_grad=True)
    opt = QuantizedMuon([p], lr=0.1, momentum=0.0)
    p.grad = torch.arange(1.0, 9.0)
    opt.step()
    cos = torch.nn.functional.cosine_similarity(-p.detach(), p.grad, dim=0)
    assert cos > 0.9999


@pytest.mark.parametrize("cls,comps", [(QuantizedAdam, "gwmv"), (QuantizedMuon, "gwm")])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_weights_and_states_live_in_their_formats(cls, comps: str, rounding: str) -> None:
    fmts = {"w": "e8m3", "m": "e8m2", "v": "e8m1", "g": "e8m2"}
    got = train(lambda ps: cls(ps, rounding=rounding, **{c: fmts[c] for c in comps}), steps=5)
    init, loss = toy_problem()
    params = [p.clone().requires_grad_() for p in init]
    opt = cls(params, rounding=rounding, **{c: fmts[c] for c in comps})
    for t in range(5):
        opt.zero_grad()
        loss(params, t).backward()
        opt.step()
    for p, q in zip(params, got, strict=True):
        assert torch.equal(quantize(p.detach(), "e8m3"), p.detach())
        assert torch.equal(p.detach(), q)  # deterministic (seeded) in both rounding modes
        state = opt.state[p]
        if cls is QuantizedAdam:
            assert torch.equal(quantize(state["exp_avg"], "e8m2"), state["exp_avg"])
            assert torch.equal(quantize(state["exp_avg_sq"], "e8m1"), state["exp_avg_sq"])
        else:
            assert torch.equal(quantize(state["momentum_buffer"], "e8m2"), state["momentum_buffer"])
    assert not torch.equal(got[0], train(lambda ps: cls(ps), steps=5)[0])  # quantization did something
