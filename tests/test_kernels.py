"""The fused (torch.compile) kernels against their eager definitions, and the switch that turns them off."""

import pytest
import torch

import muonq_hf.kernels as kernels
from muonq_hf.codecs import _quantize, quantize
from muonq_hf.lowrank import no_reduction
from muonq_hf.momentum import _normalized_update, _normalized_update_fused


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
    codes, scale = quantize(x, bits, 255.0, granularity, block_size)  # group_max None, nearest: the fused path
    ref_codes, ref_scale = _quantize(x, bits, 255.0, granularity, block_size, torch.float16)
    assert codes.dtype == torch.uint8 and torch.equal(codes, ref_codes), int((codes != ref_codes).sum())
    assert torch.equal(scale, ref_scale)


def test_compiled_normalized_update_matches_eager(compiling):
    """Norms are reductions, which the fused loop may sum in another order: equal to fp32 rounding (1e-6)."""
    g = torch.Generator().manual_seed(1)
    G, M = torch.randn(2, 64, 300, generator=g), torch.randn(2, 64, 300, generator=g)
    got = _normalized_update_fused(G, M, 0.95, True, no_reduction)
    ref = _normalized_update(G, M, 0.95, True, no_reduction)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


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


def test_a_failed_compilation_falls_back_to_eager_once(monkeypatch, caplog, compiling):
    import torch._dynamo.exc as dynamo_exc

    def broken(fn, **kw):
        def run(*a, **k):
            raise dynamo_exc.BackendCompilerFailed(lambda *x: None, RuntimeError("no C++ compiler"), None)
        return run

    monkeypatch.setattr(torch, "compile", broken)
    f = kernels.fused(lambda t: t * 2)
    with caplog.at_level("WARNING", logger="transformers.muonq_hf"):
        assert torch.equal(f(torch.ones(2)), 2 * torch.ones(2))
        assert torch.equal(f(torch.ones(2)), 2 * torch.ones(2))
    warnings = [r for r in caplog.records if "compiling" in r.getMessage()]
    assert len(warnings) == 1 and "running it eagerly from now on" in warnings[0].getMessage()
