"""Routing: which parameters Muon updates (hidden weight matrices) and which AdamW updates (the rest).

``route(model)`` decides, for every trainable parameter, its optimizer, its weight decay, the reason, and for
Muon its matrix plan (experts x pieces, ``muonq_hf.matrices``); ``param_groups(model)`` turns the routes into
MuonQ param groups. The rules are the table of docs/routing.md, in this order:

1. ``muon_names`` / ``adamw_names`` patterns (the user's word wins; a pattern that matches nothing is an error);
2. AdamW without decay: tensors of < 2 dims, biases (also stacked expert biases (E, out)), norms, SSM state
   parameters (``A_log``, ``D``, ``dt_bias``, or ``_no_weight_decay``);
3. AdamW with decay: the input layer (every ``nn.Embedding``, ``get_input_embeddings()`` and all it holds,
   e.g. ViT's patch-embedding conv, raw position/cls/register token parameters), the output layer
   (``get_output_embeddings()``, classification/regression heads: a linear layer under ``classifier``,
   ``score``, ``qa_outputs``, ``head`` with at most ``num_labels`` outputs), MoE routers (a linear layer named
   ``gate``/``router`` or of a ``*Router`` class with ``num_experts`` outputs: its rows score experts and
   orthogonalizing them would equalize the experts' update sizes), 1-row or 1-column matrices, depthwise conv
   kernels (one input channel per group: per-channel filters), PEFT embedding adapters
   (``lora_embedding_A/B``, ``trainable_tokens_delta``) and anything inside the input or output layer;
4. Muon: every other tensor of >= 2 dims, with its plan: stacked experts (3-D, not a conv) are E matrices,
   fused gate_up halves (from transformers' experts flags ``is_transposed``/``is_concatenated``, or from the
   shapes of the sibling ``down_proj``), fused QKV (GPT-2 ``c_attn``; ``qkv_proj``/``Wqkv``/``qkv`` with
   unequal q/k/v sizes from the config's heads, key-value heads and head_dim), dense ``gate_up_proj`` halves,
   grouped convs as one matrix per group. A fused layout that cannot be identified stays one matrix and the
   route says so in its ``note`` (the routing report prints it).
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .matrices import shaped

FUSED_QKV_NAMES = ("c_attn", "qkv_proj", "Wqkv", "qkv")  # leaf module names of fused [q; k; v] projections
HEAD_NAMES = ("classifier", "score", "qa_outputs", "head", "lm_head")  # module names of output heads
ROUTER_NAMES = ("gate", "router")
SSM_STATE_NAMES = ("A_log", "D", "dt_bias")  # Mamba-style state parameters: elementwise, never decayed
INPUT_HINTS = ("embed", "position", "pos_emb", "cls_token", "register_token", "mask_token", "special_token")
PEFT_EMBEDDING_HINTS = ("lora_embedding_A", "lora_embedding_B", "trainable_tokens_delta")
_NORM_HINTS = ("norm", "ln_")


@dataclass
class Route:
    """Where one trainable parameter goes, and why."""

    name: str
    param: torch.Tensor
    muon: bool
    decay: bool
    reason: str
    plan: dict[str, Any] = field(default_factory=dict)  # MuonQ group keys of the matrix plan (Muon only)
    note: str = ""  # e.g. a fused layout that could not be identified


# ------------------------------------------------------------------------------------------- helpers
def _is_conv1d(module: nn.Module) -> bool:
    """HF's GPT-2 Conv1D: a Linear whose weight is stored transposed, (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def _is_norm(module_name: str, module: nn.Module) -> bool:
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)):
        return True
    if "RMSNorm" in type(module).__name__ or "LayerNorm" in type(module).__name__:
        return True
    leaf = module_name.split(".")[-1].lower()
    return any(h in leaf for h in _NORM_HINTS)


def _config(model: nn.Module, module: nn.Module) -> Any:
    """The (text) config that describes ``module``: its own ``config`` if it has one, else the model's."""
    config = getattr(module, "config", None) or getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        try:
            config = config.get_text_config()
        except Exception:  # noqa: BLE001 - a config without a text part describes itself
            pass
    return config


def _int_attr(obj: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(obj, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _getter_module(model: nn.Module, getter: str) -> nn.Module | None:
    fn = getattr(model, getter, None)
    try:
        return fn() if callable(fn) else None
    except (NotImplementedError, AttributeError, TypeError):
        return None


def _layer_prefixes(model: nn.Module) -> tuple[set[str], set[str]]:
    """Module paths of the input layer and of the output layer (their parameters and adapters go to AdamW)."""
    paths = {id(m): name for name, m in model.named_modules()}
    inputs, outputs = set(), set()
    for getter, target in (("get_input_embeddings", inputs), ("get_output_embeddings", outputs)):
        module = _getter_module(model, getter)
        if module is not None and id(module) in paths:
            target.add(paths[id(module)])
    return inputs, outputs


def _under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _matches(pattern: str, name: str) -> bool:
    """A pattern matches the whole dotted name or any dotted suffix of it (``head.weight``, ``classifier.*``)."""
    parts = name.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[i:]), pattern) for i in range(len(parts)))


def parse_patterns(patterns: str | Iterable[str] | None) -> tuple[str, ...]:
    """``"classifier.*;score.*"`` or an iterable of patterns -> a tuple of non-empty patterns."""
    if patterns is None:
        return ()
    if isinstance(patterns, str):
        patterns = patterns.split(";")
    return tuple(p.strip() for p in patterns if p.strip())


# ---------------------------------------------------------------------------------------- plans
def _expert_plan(pname: str, module: nn.Module, p: torch.Tensor) -> tuple[dict, str]:
    """Plan keys of a stacked-experts tensor (E, a, b): fused gate_up halves where the layout is known."""
    plan: dict[str, Any] = {"experts": True}
    if "gate_up" not in pname or not getattr(module, "has_gate", True):
        return plan, ""
    if hasattr(module, "is_transposed"):  # transformers' @use_experts_implementation flags
        transposed, concatenated, how = module.is_transposed, module.is_concatenated, "experts flags"
    else:
        down = getattr(module, pname.replace("gate_up", "down"), None)
        down = shaped(down) if isinstance(down, torch.Tensor) else down
        if not isinstance(down, torch.Tensor) or down.ndim != 3:
            return plan, "gate_up layout not identified (no flags, no down_proj): kept whole per expert"
        plain = p.shape[1] == 2 * down.shape[2] and p.shape[2] == down.shape[1]
        flipped = p.shape[2] == 2 * down.shape[1] and p.shape[1] == down.shape[2]
        if plain == flipped:
            return plan, "gate_up layout not identified from shapes: kept whole per expert"
        transposed, concatenated, how = flipped, True, "shapes of down_proj"
    split_dim = 1 if transposed else 0  # (in, out) stores the two halves as columns
    if not concatenated and split_dim == 0:
        return plan, "interleaved rows are not supported: kept whole per expert"
    plan.update(qkv_split=2, split_dim=split_dim, interleave=not concatenated)
    return plan, f"gate/up halves ({'interleaved' if not concatenated else 'contiguous'}, from {how})"


def _fused_plan(model: nn.Module, module_name: str, module: nn.Module) -> tuple[dict, str]:
    """Plan keys of a dense fused QKV or gate_up weight; ({}, note) when it stays one matrix."""
    leaf = module_name.split(".")[-1]
    config = _config(model, module)
    if leaf in FUSED_QKV_NAMES:
        if _is_conv1d(module):
            if module.nf == 3 * module.nx:
                return {"qkv_split": 3, "split_dim": 1}, "q/k/v column blocks"
            return {}, "fused QKV of unknown layout: kept whole"
        if isinstance(module, nn.Linear):
            out, inp = module.out_features, module.in_features
            heads = _int_attr(module, "num_heads") or _int_attr(config, "num_attention_heads", "n_head")
            kv = _int_attr(module, "num_key_value_heads") or _int_attr(config, "num_key_value_heads") or heads
            head_dim = _int_attr(module, "head_dim") or _int_attr(config, "head_dim")
            if head_dim is None and heads:
                head_dim = _int_attr(config, "hidden_size") // heads if _int_attr(config, "hidden_size") else None
            if heads and kv and head_dim and out == (heads + 2 * kv) * head_dim:
                if heads == kv:
                    return {"qkv_split": 3, "split_dim": 0}, "q/k/v row blocks"
                sizes = [heads * head_dim, kv * head_dim, kv * head_dim]
                return {"piece_sizes": sizes, "split_dim": 0}, f"q/k/v row blocks {sizes} (grouped-query)"
            if out == 3 * inp:
                return {"qkv_split": 3, "split_dim": 0}, "q/k/v row blocks"
        return {}, "fused QKV of unknown layout: kept whole"
    if leaf == "gate_up_proj" and isinstance(module, nn.Linear):
        inter = _int_attr(config, "intermediate_size")
        if inter and module.out_features == 2 * inter:
            return {"qkv_split": 2, "split_dim": 0}, "gate/up row halves"
        return {}, "gate_up of unknown layout: kept whole"
    return {}, ""


def _is_router(model: nn.Module, module_name: str, module: nn.Module, p: torch.Tensor) -> bool:
    config = _config(model, module)
    experts = _int_attr(config, "num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
    if experts is None or p.ndim != 2 or p.shape[0] != experts:
        return False
    leaf = module_name.split(".")[-1]
    return leaf in ROUTER_NAMES or "Router" in type(module).__name__


def _is_head(model: nn.Module, module_name: str, module: nn.Module, p: torch.Tensor) -> bool:
    if not any(part in HEAD_NAMES for part in module_name.split(".")):
        return False
    labels = _int_attr(_config(model, module), "num_labels")
    return p.ndim == 2 and labels is not None and p.shape[0] <= labels


# ----------------------------------------------------------------------------------------- route
def route(
    model: nn.Module,
    split_qkv: bool = True,
    no_decay_names: set[str] | None = None,
    adamw_names: str | Iterable[str] | None = (),
    muon_names: str | Iterable[str] | None = (),
) -> list[Route]:
    """The route of every trainable parameter of ``model`` (each once, tied weights included once)."""
    adamw_patterns, muon_patterns = parse_patterns(adamw_names), parse_patterns(muon_names)
    inputs, outputs = _layer_prefixes(model)
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    layer_params = {id(p) for prefix in (*inputs, *outputs) for p in model.get_submodule(prefix).parameters()}
    routes: list[Route] = []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            name = f"{module_name}.{pname}" if module_name else pname
            where = (model, module_name, module, pname, name, p)
            routes.append(_route_one(*where, split_qkv, inputs, outputs, embeddings, layer_params))
    _apply_patterns(routes, adamw_patterns, muon_patterns)
    for r in routes:
        if no_decay_names is not None and r.name in no_decay_names and not r.muon:
            r.decay = False
    return routes


def _route_one(
    model: nn.Module,
    module_name: str,
    module: nn.Module,
    pname: str,
    name: str,
    p: torch.Tensor,
    split_qkv: bool,
    inputs: set[str],
    outputs: set[str],
    embeddings: set[int],
    layer_params: set[int],
) -> Route:
    def adamw(reason: str, decay: bool = True) -> Route:
        return Route(name, p, False, decay, reason)

    q = shaped(p)  # for shapes: p itself, or a meta stand-in of a ZeRO-3 partitioned p (ids and attributes: p)

    if q.ndim < 2:
        return adamw("vector", decay=False)
    if pname == "bias" or pname.endswith("_bias") or pname.startswith("bias"):
        return adamw("bias", decay=False)
    if _is_norm(module_name, module):
        return adamw("norm", decay=False)
    if pname in SSM_STATE_NAMES or getattr(p, "_no_weight_decay", False):
        return adamw("SSM state parameter", decay=False)
    if any(h in name for h in PEFT_EMBEDDING_HINTS):
        return adamw("PEFT embedding adapter")
    if _under(module_name, outputs) or (id(p) in layer_params and not _under(module_name, inputs)):
        return adamw("output layer")  # also a weight tied to it
    if _under(module_name, inputs) or id(p) in layer_params:
        return adamw("input layer")
    if id(p) in embeddings:
        return adamw("embedding")
    if _is_head(model, module_name, module, q):
        return adamw("output layer")
    is_conv = isinstance(module, nn.modules.conv._ConvNd)
    if not is_conv and not isinstance(module, nn.Linear) and any(h in pname.lower() for h in INPUT_HINTS):
        return adamw("input layer (embedding parameter)")
    if _is_router(model, module_name, module, q):
        return adamw("MoE router")
    if is_conv and module.in_channels // module.groups == 1:
        return adamw("depthwise conv (per-channel filters)")
    plan, note = {}, ""
    if is_conv and module.groups > 1:
        plan, note = {"experts": module.groups}, f"grouped conv: {module.groups} matrices"
    elif q.ndim == 3 and not is_conv:
        plan, note = _expert_plan(pname, module, q)
    elif split_qkv and pname == "weight":
        plan, note = _fused_plan(model, module_name, module)
    view = _matrix_shape(q, plan)
    if min(view) == 1:
        return adamw("1-row or 1-column matrix")
    return Route(name, p, True, True, "hidden matrix", plan, note)


def _matrix_shape(p: torch.Tensor, plan: dict) -> tuple[int, int]:
    if plan.get("experts") is True:
        return p.shape[1], int(torch.Size(p.shape[2:]).numel())
    groups = plan.get("experts") or 1
    return p.shape[0] // groups, int(torch.Size(p.shape[1:]).numel())


def _apply_patterns(routes: list[Route], adamw_patterns: tuple[str, ...], muon_patterns: tuple[str, ...]) -> None:
    names = [r.name for r in routes]
    for kind, patterns in (("adamw_names", adamw_patterns), ("muon_names", muon_patterns)):
        for pattern in patterns:
            if not any(_matches(pattern, n) for n in names):
                close = difflib.get_close_matches(pattern, names, n=5, cutoff=0.3)
                raise ValueError(
                    f"{kind}: pattern {pattern!r} matches no trainable parameter; similar names: {close or names[:5]}"
                    " (a pattern matches a whole dotted name or a dotted suffix of it; * and ? are wildcards)"
                )
    for r in routes:
        to_adamw = [pat for pat in adamw_patterns if _matches(pat, r.name)]
        to_muon = [pat for pat in muon_patterns if _matches(pat, r.name)]
        if to_adamw and to_muon:
            raise ValueError(f"{r.name} is matched by adamw_names {to_adamw} and by muon_names {to_muon}; pick one")
        if to_adamw and r.muon:
            r.muon, r.reason, r.plan, r.note = False, f"adamw_names {to_adamw[0]!r}", {}, ""
        elif to_muon and not r.muon:
            shape = shaped(r.param).shape
            if len(shape) < 2:
                raise ValueError(f"muon_names {to_muon[0]!r} matches {r.name} of shape {tuple(shape)}: "
                                 "Muon needs a matrix (>= 2 dims)")
            r.muon, r.decay, r.reason = True, True, f"muon_names {to_muon[0]!r}"
            r.plan = {"experts": True} if len(shape) == 3 else {}


# ------------------------------------------------------------------------------------------ groups
def param_groups(
    model: nn.Module,
    weight_decay: float | None = None,
    split_qkv: bool = True,
    no_decay_names: set[str] | None = None,
    adamw_names: str | Iterable[str] | None = (),
    muon_names: str | Iterable[str] | None = (),
    **options: Any,
) -> list[dict]:
    """Param groups for ``MuonQ``: Muon for the hidden weight matrices, AdamW for the rest (see ``route``).

    One group per (optimizer, weight decay, matrix plan). ``weight_decay=None`` leaves the decaying groups
    without the key, so ``MuonQ(..., weight_decay=wd)`` applies; norms, biases and ``no_decay_names`` (e.g. the
    Trainer's list) get 0.0. ``adamw_names`` / ``muon_names`` (patterns, ``;``-separated in a string) move
    parameters either way. ``options`` (any MuonQ group key) are copied into every group. Returns plain
    dicts: ``MuonQ(param_groups(model), lr=...)``.
    """
    routes = route(model, split_qkv, no_decay_names, adamw_names, muon_names)
    return groups_from_routes(routes, weight_decay, **options)


def groups_from_routes(routes: list[Route], weight_decay: float | None = None, **options: Any) -> list[dict]:
    groups: dict[tuple, dict] = {}
    for r in routes:
        key = (r.muon, r.decay, tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in r.plan.items())))
        if key not in groups:
            group: dict[str, Any] = {"params": [], "use_muon": r.muon, **r.plan}
            if not r.decay:
                group["weight_decay"] = 0.0
            elif weight_decay is not None:
                group["weight_decay"] = weight_decay
            groups[key] = group
        groups[key]["params"].append(r.param)
    plan_keys = ("experts", "qkv_split", "split_dim", "piece_sizes", "interleave")

    def order(g: dict) -> tuple[bool, bool, bool]:  # plain Muon, planned Muon, AdamW with decay, AdamW without
        return not g["use_muon"], any(k in g for k in plan_keys), g.get("weight_decay") == 0.0

    ordered = sorted(groups.values(), key=order)
    return [{**options, **g} for g in ordered]
