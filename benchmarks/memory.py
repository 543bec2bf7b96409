"""Optimizer-state memory: counted analytically from parameter shapes, and measured from real state tensors.

The analytic count mirrors each optimizer's state layout (MuonQ: its state schema,
``muonq_hf.memory.expected_state_bytes``; torch AdamW;
bitsandbytes AdamW8bit: ``init_state`` in ``bitsandbytes/optim/optimizer.py``), so it works for models built
on the ``meta`` device (GPT-2 medium, LLaMA-1B) without allocating anything. ``measured_bytes`` counts the
tensors a real optimizer holds after one step; the test suite checks the two agree on a small model.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from muonq_hf.memory import expected_state_bytes, state_bytes
from muonq_hf.options import DEFAULTS

from .models import build_model
from .variants import MAIN_ROWS, Variant, make_optimizer, muon_groups

BNB_BLOCK, BNB_MIN_8BIT_SIZE, BNB_QMAP_BYTES = 256, 4096, 2 * 256 * 4  # two shared fp32 qmaps of 256 entries
STEP_BYTES = 4  # torch AdamW and MuonQ keep ``step`` as a 0-d fp32 tensor per parameter; bnb as a Python int


def analytic_bytes(model: nn.Module, variant: Variant) -> dict[str, int]:
    """{"muon": bytes, "adamw": bytes, "total": bytes} of ``variant``'s state for ``model`` (meta is fine)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if variant.kind == "adamw":
        adamw = sum(8 * p.numel() + STEP_BYTES for p in params)
        return {"muon": 0, "adamw": adamw, "total": adamw}
    if variant.kind == "bnb":
        big = [p for p in params if p.numel() >= BNB_MIN_8BIT_SIZE]
        adamw = sum(8 * p.numel() for p in params if p.numel() < BNB_MIN_8BIT_SIZE)
        adamw += sum(2 * p.numel() + 2 * 4 * math.ceil(p.numel() / BNB_BLOCK) for p in big)
        adamw += BNB_QMAP_BYTES if big else 0
        return {"muon": 0, "adamw": adamw, "total": adamw}
    muon = adamw = 0
    for group in muon_groups(model, variant):
        for p in group["params"]:
            options = {**DEFAULTS, **group}  # the variant sets group keys
            if not group["use_muon"]:
                adamw += expected_state_bytes(tuple(p.shape), options)
            elif variant.kind == "muon_bf16":
                muon += 2 * p.numel()  # bf16 momentum_buffer, no step counter
            else:
                muon += expected_state_bytes(tuple(p.shape), options)
    return {"muon": muon, "adamw": adamw, "total": muon + adamw}


def measured_bytes(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of the optimizer's state tensors (``state_bytes``: each storage counted once, bnb shares its qmaps)."""
    report = state_bytes(optimizer)
    return {"muon": report["muon"]["total"], "adamw": report["adamw"]["total"], "total": report["total"]}


def measure_after_one_step(model: nn.Module, variant: Variant, seed: int = 0) -> dict[str, int]:
    """Build the variant on a real model, take one step with random gradients, count its state tensors."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 1e-2
    optimizer = make_optimizer(variant, model, lr=1e-3)
    optimizer.step()
    return measured_bytes(optimizer)


def memory_table(shapes: list[str], variants: list[Variant] = MAIN_ROWS) -> dict:
    """Analytic state bytes of every variant on every model shape (built on meta), with ratios."""
    table: dict = {}
    for shape in shapes:
        model = build_model(shape, device="meta")
        n_params = sum(p.numel() for p in model.parameters())
        rows = {v.name: analytic_bytes(model, v) for v in variants}
        ref = rows.get("muon_fp32")
        for v in variants:
            row = rows[v.name]
            row["label"] = v.label
            row["bytes_per_param"] = row["total"] / n_params
            if ref is not None:
                row["muon_ratio_vs_muon_fp32"] = ref["muon"] / row["muon"] if row["muon"] else None
                row["total_ratio_vs_muon_fp32"] = ref["total"] / row["total"]
        n_muon = sum(p.numel() for g in muon_groups(model, MAIN_ROWS[2]) if g["use_muon"] for p in g["params"])
        table[shape] = {"params": n_params, "muon_params": n_muon, "rows": rows}
    return table


def verify_analytic(shape: str = "gpt2-tiny", variants: list[Variant] | None = None) -> dict[str, tuple[int, int]]:
    """{variant: (analytic total, measured total)} on a real model of ``shape`` after one step (every row with an
    analytic count: the MuonQ family and its baselines; the peers' state is measured, ``benchmarks.peak``)."""
    from .variants import ABLATION_ROWS

    out = {}
    for v in variants or MAIN_ROWS + ABLATION_ROWS:
        model = build_model(shape)
        out[v.name] = (analytic_bytes(model, v)["total"], measure_after_one_step(model, v)["total"])
    return out
