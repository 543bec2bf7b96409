"""The optimizers users would pick instead of MuonQ, built the way they are used.

* ``torch_muon``: ``torch.optim.Muon`` (bf16 Newton-Schulz, Nesterov, AdamW-matched lr scale) on the same
  hidden matrices as MuonQ, and ``torch.optim.AdamW`` on the rest: two optimizers stepped together.
* ``keller_muon``: Keller Jordan's ``muon`` package (PyPI ``muon-optimizer``), ``SingleDeviceMuonWithAuxAdam``
  with the same split.
* ``torchao_adamw8bit`` / ``torchao_adamw4bit``: torchao's low-bit AdamW on every parameter.
* ``bnb_adamw8bit_hf``: bitsandbytes AdamW8bit as the HF Trainer runs it (``--optim adamw_bnb_8bit``): the
  Trainer registers a 32-bit override for every ``nn.Embedding`` weight (here: bnb's 32-bit AdamW on them,
  the kernel the override selects, without bnb's process-wide override registry). The plain ``bnb_adamw8bit`` row
  (``benchmarks.variants``) quantizes everything.

The Muon/AdamW split is MuonQ's own routing (``muonq_hf.param_groups``), so every Muon row orthogonalizes the
same matrices.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from muonq_hf import param_groups


class Together:
    """Several optimizers stepped as one; ``param_groups`` and ``state`` are theirs (for ``state_bytes``)."""

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = optimizers
        self.param_groups = [g for opt in optimizers for g in opt.param_groups]

    @property
    def state(self) -> dict:
        return {p: s for opt in self.optimizers for p, s in opt.state.items()}

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none)


PACKAGES = {"keller_muon": "muon", "torchao_adamw8bit": "torchao", "torchao_adamw4bit": "torchao",
            "bnb_adamw8bit_hf": "bitsandbytes", "bnb": "bitsandbytes"}  # kind -> the package it needs


def installed(kind: str) -> bool:
    """Whether the package a row needs can be imported here (a GPU machine may lack the peers' packages)."""
    return kind not in PACKAGES or importlib.util.find_spec(PACKAGES[kind]) is not None


def split_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(Muon matrices, AdamW parameters) by MuonQ's routing."""
    groups = param_groups(model)
    muon = [p for g in groups if g["use_muon"] for p in g["params"]]
    adamw = [p for g in groups if not g["use_muon"] for p in g["params"]]
    return muon, adamw


def build_peer(kind: str, model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    betas = (0.9, 0.95)
    if kind == "torch_muon":
        muon, adamw = split_params(model)
        return Together(
            torch.optim.Muon(muon, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw"),
            torch.optim.AdamW(adamw, lr=lr, betas=betas, weight_decay=weight_decay),
        )
    if kind == "keller_muon":
        from muon import SingleDeviceMuonWithAuxAdam

        muon, adamw = split_params(model)
        return SingleDeviceMuonWithAuxAdam([
            dict(params=muon, use_muon=True, lr=lr, momentum=0.95, weight_decay=weight_decay),
            dict(params=adamw, use_muon=False, lr=lr, betas=betas, eps=1e-8, weight_decay=weight_decay),
        ])
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "bnb_adamw8bit_hf":  # the Trainer's 32-bit override of every nn.Embedding weight, as a 32-bit bnb
        import bitsandbytes as bnb  # AdamW on them (bnb's override runs that same kernel; no global manager here)

        embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        rest = [p for p in params if id(p) not in embeddings]
        embedding_params = [p for p in params if id(p) in embeddings]
        return Together(
            bnb.optim.AdamW8bit(rest, lr=lr, betas=betas, weight_decay=weight_decay),
            bnb.optim.AdamW(embedding_params, lr=lr, betas=betas, weight_decay=weight_decay, optim_bits=32),
        )
    if kind in ("torchao_adamw8bit", "torchao_adamw4bit"):
        from torchao.optim import AdamW4bit, AdamW8bit

        cls = AdamW8bit if kind == "torchao_adamw8bit" else AdamW4bit
        return cls(params, lr=lr, betas=betas, weight_decay=weight_decay)
    raise ValueError(f"unknown peer optimizer {kind!r}")
