"""The optimizer rows of every benchmark: one name -> how to build that optimizer for a model.

MuonQ-family rows are MuonQ with different per-group options (see ``MUON_DEFAULTS``/``ADAMW_DEFAULTS`` in
``muonq_hf/options.py``); the baselines are torch AdamW, bitsandbytes AdamW8bit and a bf16-buffer Muon; the
peers (``benchmarks/peers.py``) are what users would pick instead: torch.optim.Muon, Keller Jordan's Muon,
the paper's own MuonQ code, torchao's low-bit AdamW and bitsandbytes as the HF Trainer runs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from muonq_hf import MuonQ, param_groups

from .peers import build_peer
from .reference_muon import MuonBF16

# Plain Muon as MuonQ options: fp32 momentum, no normalization, no split, linear codec.
PLAIN = dict(normalize=False, rank_divisor=0, mu=0.0)


@dataclass(frozen=True)
class Variant:
    """One benchmark row: ``kind`` is "adamw" (torch), "bnb" (AdamW8bit), "muonq", "muon_bf16" or a peer."""

    name: str
    label: str
    kind: str
    options: dict[str, Any] = field(default_factory=dict)  # MuonQ group options (muonq / muon_bf16 kinds)
    constructor: dict[str, Any] = field(default_factory=dict)  # MuonQ constructor arguments (batch_elements)

    @property
    def family(self) -> str:
        """"muon" or "adamw": the lr grid of the quality study is tuned per family."""
        return "muon" if self.kind in ("muonq", "muon_bf16", "torch_muon", "keller_muon", "paper_muonq") else "adamw"


MAIN_ROWS = [
    Variant("adamw", "torch AdamW fp32", "adamw"),
    Variant("bnb_adamw8bit", "bnb AdamW8bit", "bnb"),
    Variant("muon_fp32", "Muon fp32", "muonq", dict(bits=32, **PLAIN)),
    Variant("muon_bf16", "Muon bf16", "muon_bf16"),
    Variant("naive4", "naive 4-bit Muon", "muonq", dict(bits=4, **PLAIN)),
    Variant("muon8_block2048", "8-bit Muon (blockwise 2048)", "muonq", dict(bits=8, block_size=2048, **PLAIN)),
    Variant("muonq", "MuonQ 4-bit + AdamW fp32", "muonq", {}),
    Variant("muonq_adam8", "MuonQ 4-bit + AdamW 8-bit", "muonq", dict(adamw_bits=8)),
]
ABLATION_ROWS = [
    Variant("muonq_no_norm", "MuonQ w/o normalization", "muonq", dict(normalize=False)),
    Variant("muonq_no_lowrank", "MuonQ w/o low-rank split", "muonq", dict(rank_divisor=0)),
    Variant("muonq_no_mulaw", "MuonQ w/o mu-law", "muonq", dict(mu=0.0)),
    Variant("muonq_store_norm", "MuonQ + stored norm", "muonq", dict(store_norm=True)),
    Variant("muonq_sr", "MuonQ + stochastic rounding", "muonq", dict(stochastic_rounding=True)),
    Variant("muonq_8bit", "MuonQ 8-bit", "muonq", dict(bits=8)),
    Variant("muonq_polar", "MuonQ, Polar Express NS coefficients", "muonq", dict(ns_coefficients="polar_express")),
    # the same algorithm without quantization: separates MuonQ's 4-bit error from its algorithmic changes
    Variant("muonq_fp32", "MuonQ fp32 (no quantization)", "muonq", dict(bits=32)),
]
# MuonQ stepping one matrix at a time (cross-parameter batches off): what batching gains on a GPU
BATCHING_ROWS = [Variant("muonq_unbatched", "MuonQ 4-bit, one matrix at a time", "muonq", {}, {"batch_elements": 0})]
# MuonQ with its step recorded as a CUDA graph (muonq_hf.graphs): CUDA only
GRAPH_ROWS = [Variant("muonq_graph", "MuonQ 4-bit, step as a CUDA graph", "muonq", {}, {"cuda_graph": True})]
# MuonQ orthogonalizing GPT-2's fused c_attn as one 768 x 2304 matrix, as torch.optim.Muon does: the cost of the
# per-piece q/k/v Newton-Schulz that docs/design.md ("Which matrices") requires, measured beside the default
WHOLE_QKV_ROWS = [Variant("muonq_whole_qkv", "MuonQ 4-bit, fused QKV as one matrix", "muonq", dict(split_qkv=False))]
# bf16 weights without an fp32 master copy (muonq_hf.weights): how each weight_update mode keeps the updates, with
# what a pure-bf16 user runs instead (round to nearest, torchao's stochastic rounding)
LOW_PRECISION_ROWS = [
    Variant("muonq_bf16_stochastic", "MuonQ, bf16 weights rounded stochastically", "muonq",
            dict(weight_update="stochastic")),
    Variant("muonq_bf16_kahan", "MuonQ, bf16 weights with Kahan buffers", "muonq", dict(weight_update="kahan")),
    Variant("torchao_adamw8bit_bf16sr", "torchao AdamW8bit, bf16 stochastic rounding", "torchao_adamw8bit_bf16sr"),
]
PEER_ROWS = [
    Variant("torch_muon", "torch.optim.Muon + AdamW", "torch_muon"),
    Variant("keller_muon", "Keller Jordan's Muon + Adam", "keller_muon"),
    Variant("paper_muonq", "the paper's MuonQ (authors' code)", "paper_muonq"),
    Variant("bnb_adamw8bit_hf", "bnb AdamW8bit as HF runs it", "bnb_adamw8bit_hf"),
    Variant("torchao_adamw8bit", "torchao AdamW8bit", "torchao_adamw8bit"),
    Variant("torchao_adamw4bit", "torchao AdamW4bit", "torchao_adamw4bit"),
]
VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in MAIN_ROWS + ABLATION_ROWS + PEER_ROWS + BATCHING_ROWS + WHOLE_QKV_ROWS + GRAPH_ROWS + LOW_PRECISION_ROWS
}
# step time: MuonQ against what users would pick instead, and the package's own fp32 Muon
SPEED_ROWS = [VARIANTS[name] for name in (
    "torch_muon", "keller_muon", "paper_muonq", "muonq", "muonq_whole_qkv", "muonq_adam8", "muon_fp32", "adamw",
    "bnb_adamw8bit_hf", "bnb_adamw8bit", "torchao_adamw8bit", "torchao_adamw4bit",
)]


def get_variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise ValueError(f"unknown benchmark variant {name!r}; known: {sorted(VARIANTS)}")
    return VARIANTS[name]


def muon_groups(model: nn.Module, variant: Variant, weight_decay: float = 0.0) -> list[dict]:
    """MuonQ param groups of ``model`` with the variant's options (Muon for hidden matrices, AdamW else)."""
    return param_groups(model, weight_decay=weight_decay, **variant.options)


def make_optimizer(variant: Variant, model: nn.Module, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """Build the variant's optimizer over ``model``'s trainable parameters."""
    if variant.kind == "adamw":
        return torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay
        )
    if variant.kind == "bnb":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(
            [p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay
        )
    if variant.kind not in ("muonq", "muon_bf16"):
        return build_peer(variant.kind, model, lr, weight_decay)
    cls = MuonBF16 if variant.kind == "muon_bf16" else MuonQ
    return cls(muon_groups(model, variant, weight_decay), lr=lr, **variant.constructor)
