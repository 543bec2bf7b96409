"""bf16 matmuls on every device: native where the hardware multiplies bf16, emulated exactly enough where not.

Newton-Schulz and the split's large products run in bf16, as every Muon does. A GPU and a CPU with bf16 dot
products (AVX-512 BF16 or AMX) multiply bf16 natively. A CPU without them (AVX2: AMD before Zen 4, Intel before
Cooper Lake) falls back to a reference kernel 50-100x slower than its fp32 GEMM (768 x 768 x 2304: 810 vs
10 ms on this project's AVX2 machine, benchmarks/RESULTS.md). There ``bf16_matmul`` computes the product in
fp32 from the bf16 values (exact: a bf16 value is an fp32 value) and rounds the result to bf16 once: what a
native bf16 GEMM does (fp32 accumulation, one rounding of the output), up to the order of the fp32 sums
(measured: 1e-4 of the entries differ, by one bf16 rounding).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch


@functools.cache
def _cpu_multiplies_bf16() -> bool:
    """Whether this CPU has bf16 dot products (AVX-512 BF16 or AMX tiles)."""
    cpu = torch.cpu
    return any(getattr(cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


_emulation: dict[str, bool | None] = {"forced": None}


def set_bf16_emulation(enabled: bool | None) -> None:
    """Emulate bf16 products on CPU (True), never (False), or where the CPU lacks bf16 dot products (None, the
    default). benchmarks/launches.py turns it off to count the kernels a GPU launches."""
    if enabled not in (True, False, None):
        raise ValueError(f"set_bf16_emulation({enabled!r}): expected True, False or None")
    _emulation["forced"] = enabled


def emulates_bf16(device: torch.device) -> bool:
    """Whether bf16 products on ``device`` are computed in fp32 and rounded (a CPU without bf16 dot products)."""
    forced = _emulation["forced"]
    return device.type == "cpu" and (not _cpu_multiplies_bf16() if forced is None else forced)


def bf16_matmul(
    L: torch.Tensor,
    R: torch.Tensor,
    C: torch.Tensor | None = None,
    beta: float = 0.0,
    alpha: float = 1.0,
    fused_mm: Callable[..., torch.Tensor] = torch.addmm,
) -> torch.Tensor:
    """L @ R, or ``fused_mm(C, L, R, beta=beta, alpha=alpha)`` (addmm / baddbmm: beta C + alpha L R), of tensors
    in one dtype, in that dtype. bf16 on a CPU without bf16 dot products: the fp32 product, rounded once."""
    if L.dtype == torch.bfloat16 and emulates_bf16(L.device):
        out = L.float() @ R.float() if C is None else fused_mm(C.float(), L.float(), R.float(), beta=beta, alpha=alpha)
        return out.to(torch.bfloat16)
    return L @ R if C is None else fused_mm(C, L, R, beta=beta, alpha=alpha)
