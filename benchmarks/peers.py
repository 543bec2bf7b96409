"""The optimizers users would pick instead of MuonQ, built the way they are used.

* ``torch_muon``: ``torch.optim.Muon`` (bf16 Newton-Schulz, Nesterov, AdamW-matched lr scale) on the same
  hidden matrices as MuonQ, and ``torch.optim.AdamW`` on the rest: two optimizers stepped together.
* ``keller_muon``: Keller Jordan's ``muon`` package (PyPI ``muon-optimizer``), ``SingleDeviceMuonWithAuxAdam``
  with the same split.
* ``torchao_adamw8bit`` / ``torchao_adamw4bit``: torchao's low-bit AdamW on every parameter (``_bf16sr``: with its
  ``bf16_stochastic_round`` option, for bf16 weights without an fp32 master copy).
* ``paper_muonq``: the MuonQ paper's own code (``MuonQ`` of ``src/optim/muonq.py`` in a checkout of the authors'
  repository, github.com/YupengSu/MuonQ, Apache-2.0), with the options of its ``muonq.yaml`` (4-bit, per-tensor
  scale, normalization, mu-law, rank min(m, n) // 16). It is not on PyPI and not vendored here: set
  ``MUONQ_REFERENCE_SRC`` to the checkout's root (see benchmarks/RESULTS.md); without it the row is left out,
  and said to be. Its split of a fused QKV assumes ``nn.Linear``'s (3d, d) layout, the layout of its own GPT-2,
  so it steps transposed views of GPT-2's ``Conv1D`` weights (same storage; the views' gradients are the
  transposed gradients, set before each step): the same matrices, the same math, as in the paper's runs.
* ``bnb_adamw8bit_hf``: bitsandbytes AdamW8bit as the HF Trainer runs it (``--optim adamw_bnb_8bit``): the
  Trainer registers a 32-bit override for every ``nn.Embedding`` weight (here: bnb's 32-bit AdamW on them,
  the kernel the override selects, without bnb's process-wide override registry). The plain ``bnb_adamw8bit`` row
  (``benchmarks.variants``) quantizes everything.

The Muon/AdamW split is MuonQ's own routing (``muonq_hf.param_groups``), so every Muon row orthogonalizes the
same matrices.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

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
            "torchao_adamw8bit_bf16sr": "torchao",
            "bnb_adamw8bit_hf": "bitsandbytes", "bnb": "bitsandbytes"}  # kind -> the package it needs


REFERENCE_ENV = "MUONQ_REFERENCE_SRC"  # root of a checkout of the paper's repository (github.com/YupengSu/MuonQ)
# the paper's hydra_conf/optimizer_params/muonq.yaml, less lr and weight decay (the benchmark's own)
PAPER_MUONQ_OPTIONS = dict(polar_method="Keller", ns_steps=5, qbit=4, gran="tensor", compand=True, norm=True, rank=16)


def reference_source() -> Path | None:
    """The paper's checkout named by ``MUONQ_REFERENCE_SRC`` if it holds ``src/optim/muonq.py``, else None."""
    root = os.environ.get(REFERENCE_ENV)
    return Path(root) if root and (Path(root) / "src" / "optim" / "muonq.py").is_file() else None


def installed(kind: str) -> bool:
    """Whether the package a row needs can be imported here (a GPU machine may lack the peers' packages)."""
    if kind == "paper_muonq":
        return reference_source() is not None
    return kind not in PACKAGES or importlib.util.find_spec(PACKAGES[kind]) is not None


class PaperMuonQ(Together):
    """The paper's ``MuonQ`` over ``model``, every ``Conv1D`` weight seen through its transpose (nn.Linear layout)."""

    def __init__(self, model: nn.Module, lr: float, weight_decay: float) -> None:
        root = reference_source()
        if root is None:
            raise RuntimeError(f"the paper_muonq row needs {REFERENCE_ENV}=<checkout of github.com/YupengSu/MuonQ>; "
                               f"{REFERENCE_ENV}={os.environ.get(REFERENCE_ENV)!r} has no src/optim/muonq.py")
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
        from src.optim.muonq import MuonQ as Reference  # the paper's package is named ``src``
        from transformers.pytorch_utils import Conv1D

        conv = {id(m.weight) for m in model.modules() if isinstance(m, Conv1D)}
        self.transposed: list[tuple[nn.Parameter, nn.Parameter]] = []  # (view the reference steps, model weight)
        named = []
        for name, p in model.named_parameters():
            if id(p) in conv:  # a Parameter over p.T shares p's storage: the reference's in-place update is p's
                view = nn.Parameter(p.detach().T, requires_grad=False)
                self.transposed.append((view, p))
                p = view
            named.append((name, p))
        super().__init__(Reference(named, lr=lr, weight_decay=weight_decay, **PAPER_MUONQ_OPTIONS))

    def step(self) -> None:
        for view, p in self.transposed:
            view.grad = None if p.grad is None else p.grad.T
        super().step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for view, _ in self.transposed:
            view.grad = None
        super().zero_grad(set_to_none)


def split_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(Muon matrices, AdamW parameters) by MuonQ's routing."""
    groups = param_groups(model)
    muon = [p for g in groups if g["use_muon"] for p in g["params"]]
    adamw = [p for g in groups if not g["use_muon"] for p in g["params"]]
    return muon, adamw


def build_peer(kind: str, model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    betas = (0.9, 0.95)
    if kind == "torch_muon":  # torch.optim.Muon takes 2-D parameters only: 3-D MoE experts go to its AdamW
        muon, adamw = split_params(model)
        muon, adamw = [p for p in muon if p.ndim == 2], adamw + [p for p in muon if p.ndim != 2]
        return Together(
            torch.optim.Muon(muon, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw"),
            torch.optim.AdamW(adamw, lr=lr, betas=betas, weight_decay=weight_decay),
        )
    if kind == "paper_muonq":
        return PaperMuonQ(model, lr, weight_decay)
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
    if kind in ("torchao_adamw8bit", "torchao_adamw4bit", "torchao_adamw8bit_bf16sr"):
        from torchao.optim import AdamW4bit, AdamW8bit

        cls = AdamW4bit if kind == "torchao_adamw4bit" else AdamW8bit
        rounding = {"bf16_stochastic_round": True} if kind.endswith("_bf16sr") else {}  # its pure-bf16 option
        return cls(params, lr=lr, betas=betas, weight_decay=weight_decay, **rounding)
    raise ValueError(f"unknown peer optimizer {kind!r}")
