"""The Muon/AdamW split of a model's parameters: hidden matrices to Muon, everything else to AdamW."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# Names of fused [q; k; v] projections made of three equal, contiguous blocks.
FUSED_QKV_NAMES = ("c_attn", "qkv_proj", "Wqkv", "qkv")
_NORM_HINTS = ("norm", "ln_")


def _is_conv1d(module: nn.Module) -> bool:
    """HF's GPT-2 Conv1D: a Linear whose weight is stored transposed, (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def fused_qkv_split(name: str, module: nn.Module) -> tuple[int, int] | None:
    """(qkv_split, split_dim) for a fused QKV weight with three equal blocks, else None.

    GPT-2's ``c_attn`` is a Conv1D with weight (d, 3d): the blocks are column ranges (split_dim=1).
    A Linear ``qkv_proj``-style weight is (3d, d): the blocks are row ranges (split_dim=0). Layouts with
    unequal blocks (grouped-query attention) or per-head interleaving are left whole.
    """
    if name.split(".")[-1] not in FUSED_QKV_NAMES:
        return None
    if _is_conv1d(module) and module.nf == 3 * module.nx:
        return 3, 1
    if isinstance(module, nn.Linear) and module.out_features == 3 * module.in_features:
        return 3, 0
    return None


def _embedding_params(model: nn.Module) -> set[int]:
    """ids of input/output embedding weights (and anything tied to them) and of every nn.Embedding."""
    found: set[int] = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        try:
            module = fn() if callable(fn) else None
        except (NotImplementedError, AttributeError):
            module = None
        if module is not None and getattr(module, "weight", None) is not None:
            found.add(id(module.weight))
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            found.add(id(module.weight))
    return found


def _is_norm(module_name: str, module: nn.Module) -> bool:
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)):
        return True
    if "RMSNorm" in type(module).__name__ or "LayerNorm" in type(module).__name__:
        return True
    leaf = module_name.split(".")[-1].lower()
    return any(h in leaf for h in _NORM_HINTS)


def param_groups(
    model: nn.Module,
    weight_decay: float = 0.0,
    split_qkv: bool = True,
    no_decay_names: set[str] | None = None,
    adamw_names: tuple[str, ...] = (),
    **options: Any,
) -> list[dict]:
    """Param groups for ``MuonQ``: Muon for >= 2-D weights inside the network, AdamW for the rest.

    AdamW gets the input and output embeddings (found through ``get_input_embeddings()`` /
    ``get_output_embeddings()``, tied weights and every ``nn.Embedding``), norms, biases and any tensor of
    fewer than 2 dims. Frozen parameters are left out. Weight decay applies to matrices and embeddings,
    not to norms and biases (or to ``no_decay_names``, e.g. the Trainer's own list). ``adamw_names``
    sends more matrices to AdamW by name suffix: a plain ``nn.Module`` has no ``get_output_embeddings()``,
    so name its output layer there (e.g. ``adamw_names=("head.weight",)``). Fused QKV weights get
    their own group with ``qkv_split``/``split_dim`` when ``split_qkv``. ``options`` (any MuonQ group key)
    are copied into every group. Returns plain dicts: ``MuonQ(param_groups(model), lr=...)``.
    """
    embeddings = _embedding_params(model)
    seen: set[int] = set()
    muon: list[torch.Tensor] = []
    fused: dict[tuple[int, int], list[torch.Tensor]] = {}
    adamw_decay: list[torch.Tensor] = []
    adamw_no_decay: list[torch.Tensor] = []
    for module_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            full_name = f"{module_name}.{pname}" if module_name else pname
            no_decay = (
                p.ndim < 2
                or pname == "bias"
                or _is_norm(module_name, module)
                or (no_decay_names is not None and full_name in no_decay_names)
            )
            named_adamw = any(full_name.endswith(suffix) for suffix in adamw_names)
            to_adamw = id(p) in embeddings or _is_norm(module_name, module) or named_adamw
            if p.ndim >= 2 and not to_adamw:
                split = fused_qkv_split(module_name, module) if split_qkv and pname == "weight" else None
                (fused.setdefault(split, []) if split else muon).append(p)
            elif no_decay:
                adamw_no_decay.append(p)
            else:
                adamw_decay.append(p)
    groups = [dict(params=muon, use_muon=True, weight_decay=weight_decay)]
    for (k, dim), params in fused.items():
        groups.append(dict(params=params, use_muon=True, weight_decay=weight_decay, qkv_split=k, split_dim=dim))
    groups.append(dict(params=adamw_decay, use_muon=False, weight_decay=weight_decay))
    groups.append(dict(params=adamw_no_decay, use_muon=False, weight_decay=0.0))
    return [{**options, **g} for g in groups if g["params"]]
