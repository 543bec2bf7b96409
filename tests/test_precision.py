"""bf16 products on CPUs without bf16 dot products (muonq_hf.precision): the fp32 product of the bf16 values,
rounded once, against torch's own bf16 kernel; other dtypes and devices pass through."""

from __future__ import annotations

import pytest
import torch

from muonq_hf import precision
from muonq_hf.precision import bf16_matmul, emulates_bf16, set_bf16_emulation


@pytest.fixture
def emulation():
    yield set_bf16_emulation
    set_bf16_emulation(None)


def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 values at |x| (8 significant bits): 2^(floor(log2 |x|) - 7)."""
    return torch.exp2(torch.floor(torch.log2(x.abs().clamp(min=1e-30))) - 7)


@pytest.mark.parametrize("shape", [(64, 96, 80), (3, 48, 200, 40)])
def test_emulated_bf16_products_are_torchs_bf16_products_to_one_rounding(emulation, shape):
    """An element differs from the native bf16 GEMM by at most one bf16 step (the fp32 sums run in another order),
    and few elements differ at all; addmm / baddbmm with beta and alpha the same."""
    gen = torch.Generator().manual_seed(0)
    *lead, m, k, n = shape
    L, R = (torch.randn(*lead, *s, generator=gen).bfloat16() for s in ((m, k), (k, n)))
    C = torch.randn(*lead, m, n, generator=gen).bfloat16()
    fused_mm = torch.baddbmm if lead else torch.addmm
    for args in ((L, R), (L, R, C, 0.5, -2.0, fused_mm)):
        emulation(True)
        emulated = bf16_matmul(*args)
        emulation(False)
        native = bf16_matmul(*args)
        assert emulated.dtype == native.dtype == torch.bfloat16 and emulated.shape == native.shape
        diff = (emulated.float() - native.float()).abs()
        worst = float((diff / _bf16_ulp(native.float())).max())
        assert worst <= 1.0, f"an element differs by {worst:.2f} bf16 steps"
        share = float((diff > 0).float().mean())
        assert share < 0.02, f"{share:.2%} of the elements differ"


def test_other_dtypes_and_devices_pass_through(emulation):
    L, R = torch.randn(8, 16), torch.randn(16, 4)
    emulation(True)
    assert torch.equal(bf16_matmul(L, R), L @ R)  # fp32 stays fp32, no rounding
    assert not emulates_bf16(torch.device("meta")) and not emulates_bf16(torch.device("cuda"))
    emulation(None)
    assert emulates_bf16(torch.device("cpu")) == (not precision._cpu_multiplies_bf16())
    with pytest.raises(ValueError, match=r"set_bf16_emulation\('yes'\): expected True, False or None"):
        set_bf16_emulation("yes")
