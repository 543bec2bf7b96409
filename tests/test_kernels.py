"""The fused (torch.compile) kernels against their eager definitions, and the switch that turns them off."""

import pytest
import torch

import muonq_hf.kernels as kernels
from muonq_hf.codecs import _dequantize, dequantize, quantize
from muonq_hf.lowrank import no_reduction
from muonq_hf.momentum import _normalized_update, _normalized_update_fused
from muonq_hf.options import DEFAULTS
from muonq_hf.state import QuantizedMomentum


@pytest.fixture
def compiling():
    was = kernels.compile_enabled()
    kernels.set_compile(True)
    yield
    kernels.set_compile(was)


@pytest.mark.parametrize(("bits", "granularity", "block_size", "shape"), [
    (4, "matrix", None, (2, 96, 257)),  # odd width: a padded last nibble
    (4, "column", None, (1, 96, 12)),
    (4, "block", 64, (1, 40, 200)),
    (8, "matrix", None, (3, 33, 64)),
])
def test_compiled_encode_gives_the_eager_codes(compiling, bits, granularity, block_size, shape):
    """The same fp32 operations fused into one loop: codes and scales equal the eager ones bit for bit."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    x = x / x.norm()
    codes, scale = quantize(x, bits, 255.0, granularity, block_size)  # nearest: the fused codes loop
    kernels.set_compile(False)
    ref_codes, ref_scale = quantize(x, bits, 255.0, granularity, block_size)
    assert codes.dtype == torch.uint8 and torch.equal(codes, ref_codes), int((codes != ref_codes).sum())
    assert torch.equal(scale, ref_scale)


def test_compiled_encode_of_a_transposed_view_gives_the_contiguous_codes(compiling):
    """R = (P^T M)^T reaches the encode as a transposed view: the compiled codes loop packs its rows all the same
    (two neighbouring codes per byte need contiguous rows; a strided view once stopped the compilation)."""
    R = torch.randn(2, 12, 301, generator=torch.Generator().manual_seed(4)).mT  # (2, 301, 12), strides of a .mT
    assert not R.is_contiguous()
    codes, scale = quantize(R, 4, 255.0, "column")
    ref_codes, ref_scale = quantize(R.contiguous(), 4, 255.0, "column")
    assert torch.equal(codes, ref_codes) and torch.equal(scale, ref_scale)


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
def test_compiled_normalized_update_matches_eager(compiling, nesterov, x_dtype):
    """Norms are reductions, which the fused loop may sum in another order: fp32 outputs equal to fp32 rounding
    (1e-6), bf16 ones to one bf16 step (2^-7: an fp32 ulp can cross a bf16 rounding boundary). The NS input
    comes out in NS's dtype; without nesterov a bf16 one is the bf16 M_bar the split uses."""
    g = torch.Generator().manual_seed(1)
    G, res = torch.randn(2, 64, 300, generator=g), torch.randn(2, 64, 300, generator=g)
    low_rank = torch.randn(2, 64, 300, generator=g).bfloat16()
    norm = torch.rand(2, 1, 1, generator=g) + 0.5
    args = (G, res, low_rank, norm, 0.95, True, nesterov, torch.bfloat16, x_dtype, no_reduction)
    got, ref = _normalized_update_fused(*args), _normalized_update(*args)
    for name, a, b in zip(("X", "M_bar", "M_low", "norm"), got, ref, strict=True):
        rtol = 2**-7 if a.dtype == torch.bfloat16 else 1e-6
        torch.testing.assert_close(a, b, rtol=rtol, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")
    assert got[0].dtype == x_dtype
    X, M_bar, M_low, _ = ref
    expected = (G / (G.norm(dim=(1, 2), keepdim=True) + 1e-7) + 0.95 * M_bar) if nesterov else M_bar
    torch.testing.assert_close(X.float(), expected, rtol=2**-7 if x_dtype == torch.bfloat16 else 1e-6, atol=1e-7)
    assert (X is M_low) == (not nesterov and x_dtype == torch.bfloat16)


@pytest.mark.parametrize(("rank", "granularity", "block_size"), [(0, "matrix", None), (6, "matrix", None),
                                                              (6, "block", 64)])
def test_compiled_residual_encode_gives_the_eager_codes(compiling, rank, granularity, block_size):
    """The residual M - P R^T formed inside the two encode loops: the codes and scales of the eager residual,
    bit for bit (the same elementwise ops; the product is the same bf16 matmul)."""
    g = torch.Generator().manual_seed(2)
    M = torch.randn(2, 64, 301, generator=g) / 100
    momentum = QuantizedMomentum.of((64, 301), {**DEFAULTS, "use_muon": True, "rank_divisor": 64 // rank if rank else 0,
                                                "block_size": block_size})
    P = torch.randn(2, 64, rank, generator=g) if rank else None
    R = torch.randn(2, 301, rank, generator=g) / 1000 if rank else None
    fused_pieces, eager = {}, {}
    momentum.encode(fused_pieces, M, P, R, None, (0,))  # one process, nearest: the fused kernels
    momentum.encode(eager, M, P, R, None, (0,), row_max=lambda t: t)  # a (trivial) reduction: the eager path
    assert fused_pieces.keys() == eager.keys()
    for key in fused_pieces:
        differ = int((fused_pieces[key] != eager[key]).sum())
        assert differ == 0, f"{key}: {differ} of {eager[key].numel()} entries differ"


def test_switch_off_runs_eagerly_and_bad_values_are_refused(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append(fn) or fn)
    f = kernels.fused(lambda t: t + 1)
    was = kernels.compile_enabled()
    try:
        kernels.set_compile(False)
        assert torch.equal(f(torch.zeros(2)), torch.ones(2)) and calls == []  # eager: torch.compile not called
        kernels.set_compile(True)
        f(torch.zeros(2))
        assert len(calls) == 1  # compiled on first use
    finally:
        kernels.set_compile(was)
    with pytest.raises(ValueError, match=r"set_compile\('yes'\): expected True or False"):
        kernels.set_compile("yes")
    monkeypatch.setenv("MUONQ_HF_COMPILE", "maybe")
    with pytest.raises(ValueError, match=r"MUONQ_HF_COMPILE='maybe' is not allowed; MUONQ_HF_COMPILE must be 1"):
        kernels._from_environment()


@pytest.mark.parametrize("failure", ["backend", "trace"])
def test_a_failed_compilation_falls_back_to_eager_once(monkeypatch, caplog, compiling, failure):
    """No compiler (a backend failure) or a graph dynamo cannot trace: eager from then on, one warning."""
    import torch._dynamo.exc as dynamo_exc

    def broken(fn, **kw):
        def run(*a, **k):
            if failure == "backend":
                raise dynamo_exc.BackendCompilerFailed(lambda *x: None, RuntimeError("no C++ compiler"), None)
            raise dynamo_exc.TorchRuntimeError("RuntimeError when making fake tensor call")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    f = kernels.fused(lambda t: t * 2)
    with caplog.at_level("WARNING", logger="transformers.muonq_hf"):
        assert torch.equal(f(torch.ones(2)), 2 * torch.ones(2))
        assert torch.equal(f(torch.ones(2)), 2 * torch.ones(2))
    warnings = [r for r in caplog.records if "compiling" in r.getMessage()]
    assert len(warnings) == 1 and "running it eagerly from now on" in warnings[0].getMessage()


def test_an_error_of_the_function_itself_reaches_the_caller(compiling):
    """The eager rerun after a failed compilation raises the function's own error, not a compiler's."""
    import torch._dynamo.exc as dynamo_exc

    f = kernels.fused(lambda t: t.mT.view(torch.int16))  # a uint8 view as int16 needs unit last stride
    with pytest.raises(RuntimeError, match="must be 1 to view Byte as Short") as raised:
        f(torch.zeros(4, 6, dtype=torch.uint8))
    assert not isinstance(raised.value, dynamo_exc.TorchDynamoException), type(raised.value)


@pytest.mark.parametrize(("bits", "granularity", "block_size", "shape"), [
    (4, "column", None, (2, 96, 12)),
    (4, "block", 64, (1, 40, 201)),  # odd width: the padded last nibble is dropped
    (8, "column", None, (1, 33, 7)),
])
def test_compiled_decode_gives_the_eager_values(compiling, bits, granularity, block_size, shape):
    """Unpack, scale and expand in one loop: the eager values (fp32 expm1 of the same products, to 1 ulp)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3)) / 10
    codes, scale = quantize(x, bits, 255.0, granularity, block_size)
    got = dequantize(codes, scale, shape[-1], bits, 255.0, granularity, block_size)
    ref = _dequantize(codes, scale, shape[-1], bits, 255.0, granularity, block_size)
    torch.testing.assert_close(got, ref, rtol=2e-7, atol=0)
    assert (got - x).abs().max() < x.abs().max() / 2  # and they decode x (to a 4-bit code's step)


def test_a_fused_function_keeps_more_compiled_variants_than_torchs_default(compiling, caplog):
    """One model gives a fused function more than torch's 8 variants (square or not, 1 or c matrices, None on the
    first step, dtypes); past the limit torch would run it eagerly. 10 variants here, none falls back, and the
    process's own limit is what it was."""
    import torch._dynamo

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    before = getattr(config, name)
    f = kernels.fused(lambda t: t * 2)
    dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.int16, torch.int32,
              torch.int64, torch.uint8, torch.complex64]  # each dtype compiles a graph of its own
    with caplog.at_level("WARNING"):
        for dtype in dtypes:
            assert torch.equal(f(torch.ones(3, dtype=dtype)), torch.full((3,), 2, dtype=dtype))
    hits = [r.getMessage() for r in caplog.records if "recompile_limit" in r.getMessage()]
    assert not hits, hits
    assert getattr(config, name) == before


def _adamw8_run(steps: int) -> tuple[torch.Tensor, dict]:
    """``steps`` AdamW steps of a (300, 512) weight with 8-bit moments (two chunks of rows), a new lr each step."""
    from muonq_hf.adamw import adamw_step

    g = torch.Generator().manual_seed(3)
    weight, state = torch.randn(300, 512, generator=g), {}
    for i in range(steps):
        group = {**DEFAULTS, "adamw_bits": 8, "lr": 1e-3 * (i + 1), "weight_decay": 0.1}
        adamw_step(weight, torch.randn(weight.shape, generator=g), state, group, True)
    return weight, state


def test_compiled_8bit_adamw_matches_eager_and_compiles_once(compiling, monkeypatch):
    """The fused 8-bit AdamW (decode, update, encode in one call): the compiled weights equal the eager ones to fp32
    rounding, except where a moment's code flipped (an ulp crossed a rounding boundary: under 1e-4 of the codes),
    and a new lr and step count at every step compile nothing again (one graph)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    import muonq_hf.adamw as adamw

    monkeypatch.setattr(adamw, "CHUNK_ELEMENTS", 200 * 512)  # two chunks of rows: 200 and 100
    torch._dynamo.reset()
    graphs = counters["stats"]["unique_graphs"]
    weight, state = _adamw8_run(4)
    assert counters["stats"]["unique_graphs"] - graphs == 1, "the 8-bit AdamW step compiled more than one graph"
    kernels.set_compile(False)
    ref_weight, ref_state = _adamw8_run(4)
    for key in ("exp_avg_codes", "exp_avg_sq_codes"):
        flipped = (state[key] != ref_state[key]).float().mean().item()
        assert flipped < 1e-4, f"{key}: {flipped:.2e} of the codes differ from eager"
    moved = (weight - ref_weight).abs() > 1e-6 * ref_weight.abs() + 1e-7
    assert moved.float().mean() < 0.05, f"{moved.float().mean():.3f} of the weights differ from eager"
