"""Kernel launches per optimizer step, counted on the CPU's dispatcher: what a GPU step pays per launch.

A GPU step of small matrices is bound by launches and host work, not by arithmetic. This counts, for one
optimizer step of each row on one model, the dispatched ops that run a kernel (``KernelCount``: views,
allocations and metadata ops excluded), with each call of a fused function (``muonq_hf.kernels.fused``, one
``torch.compile`` graph: one Triton kernel, or a few where inductor splits a reduction) counted once and the
ops inside it not counted. Counted with compiling off, so the count does not depend on a compiler being
present, and with bf16 products native (``muonq_hf.precision``: a CPU without bf16 dot products converts each
product's operands, which a GPU does not). ``batch_elements`` defaults differ by device: the row
``muonq_cuda_groups`` uses CUDA's.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from muonq_hf import kernels, precision

from .models import build_model
from .variants import VARIANTS, Variant, make_optimizer

# torch.optim.Muon + AdamW (what a Muon user runs today), MuonQ with this device's and with CUDA's group size, and
# MuonQ one matrix at a time (batch_elements=0)
LAUNCH_ROWS = [
    VARIANTS["torch_muon"],
    VARIANTS["keller_muon"],
    VARIANTS["muonq"],
    Variant("muonq_cuda_groups", "MuonQ, CUDA's group size (2^23)", "muonq", {}, {"batch_elements": 1 << 23}),
    VARIANTS["muonq_adam8"],
    VARIANTS["muonq_unbatched"],
]

# ops that run no kernel: views, allocation without initialization, metadata and host reads
FREE = ("view", "as_strided", "slice", "unsqueeze", "transpose", "t", "expand", "select", "_unsafe_view", "alias",
        "permute", "squeeze", "detach", "unbind", "split", "split_with_sizes", "empty", "empty_like",
        "empty_strided", "new_empty", "new_empty_strided", "chunk", "unflatten", "_reshape_alias", "lift_fresh",
        "is_same_size", "result_type", "_local_scalar_dense", "sym_size", "sym_stride", "sym_numel",
        "sym_storage_offset", "diagonal", "narrow", "set_", "resize_", "_has_compatible_shallow_copy_type")


class KernelCount(TorchDispatchMode):
    """Counts the kernel-launching ops dispatched while it is active, by op name; a fused call counts once."""

    def __init__(self) -> None:
        super().__init__()
        self.by_op: dict[str, int] = {}

    def __enter__(self) -> KernelCount:
        self._fused_before = kernels.fused_calls()
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        calls = kernels.fused_calls() - self._fused_before
        if calls:
            self.by_op["fused (one compiled graph)"] = calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        name = func.__name__.split(".")[0]
        if name not in FREE and not kernels.inside_fused():
            self.by_op[name] = self.by_op.get(name, 0) + 1
        return func(*args, **(kwargs or {}))

    @property
    def count(self) -> int:
        return sum(self.by_op.values())


def launches_per_step(shape: str, variants: list[Variant], steps: int = 2, device: str = "cpu", **overrides) -> dict:
    """{row: {"launches", "by_op" (the 8 most frequent)}} for one step after ``steps`` warm-up steps, on the
    model ``shape`` (``benchmarks.models``, with config ``overrides``) on ``device``, gradients fixed."""
    model = build_model(shape, device=device, **overrides)
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-2).to(device)
    rows = {}
    compiling = kernels.compile_enabled()
    kernels.set_compile(False)
    precision.set_bf16_emulation(False)
    try:
        for v in variants:
            opt = make_optimizer(v, model, lr=1e-4)
            for _ in range(steps):
                opt.step()
            with KernelCount() as counter:
                opt.step()
            top = sorted(counter.by_op.items(), key=lambda kv: -kv[1])[:8]
            rows[v.name] = {"label": v.label, "launches": counter.count, "by_op": dict(top)}
    finally:
        kernels.set_compile(compiling)
        precision.set_bf16_emulation(None)
    n_matrices = sum(1 for p in model.parameters() if p.ndim >= 2)
    return {"shape": shape, "device": device, "overrides": overrides, "tensors": len(list(model.parameters())),
            "matrices": n_matrices, "rows": rows}
