"""The checks run on a loaded MuonQ state before anything changes, and the conversion of a state saved with
other storage options (docs/checkpoints.md, "Options and resume"; layout: docs/design.md, ``muonq_hf.state``).

``check_state_dict`` compares a checkpoint against it (keys, shapes, dtypes, finite values, non-negative
second moments and scales, valid saved options) and raises ``CheckpointError`` naming the parameter and the
entry. ``convert_state`` re-encodes one parameter's state from the saved options to the current ones.
"""

from __future__ import annotations

from typing import Any

import torch

from .codecs import dequantize_dynamic8, quantize_dynamic8
from .lowrank import no_reduction, power_iteration_factors
from .matrices import MatrixPlan, plan_of
from .momentum import frobenius
from .options import validate_group
from .state import (
    ADAMW_8BIT_BLOCK,
    ADAMW_MOMENTS,
    U8,
    QuantizedMomentum,
    adamw_quantized,
    generator,
    moment_codebook,
    state_schema,
)
from .weights import KAHAN

# Options that decide how the state is stored (a change converts the state); the others are hyperparameters
MUON_STORAGE = ("bits", "rank_divisor", "mu", "block_size", "normalize", "store_norm", "qkv_split", "split_dim",
                "piece_sizes", "interleave", "experts")
ADAMW_STORAGE = ("adamw_bits",)


class CheckpointError(ValueError):
    """A checkpoint that does not fit this optimizer or is corrupt; nothing was changed."""


# ------------------------------------------------------------------------------------------- checks
def _nonnegative(key: str) -> bool:
    return key.endswith(("_scale", "_absmax", "exp_avg_sq")) or key in ("norm", "step")


def _check_entry(where: str, key: str, value: Any, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    if not torch.is_tensor(value):
        raise CheckpointError(f"{where}: state entry {key!r} is a {type(value).__name__}, expected a tensor")
    got = tuple(value.shape)
    if got != shape or value.dtype != dtype:
        raise CheckpointError(
            f"{where}: state entry {key!r} is {value.dtype} {got}, expected {dtype} {shape} for this parameter "
            "and these options"
        )
    if dtype == U8:
        return
    local = value.to_local() if hasattr(value, "to_local") else value
    if not bool(torch.isfinite(local).all()):
        raise CheckpointError(f"{where}: state entry {key!r} holds non-finite values: the checkpoint is corrupt")
    if _nonnegative(key) and bool((local < 0).any()):
        raise CheckpointError(f"{where}: state entry {key!r} holds negative values: the checkpoint is corrupt")


def check_state_dict(param_groups: list[dict], defaults: dict, state_dict: Any) -> None:
    """Raise CheckpointError unless ``state_dict`` is a MuonQ state that fits ``param_groups`` and is sound.

    Saved entries are checked against the schema of the *saved* options (a state saved with other storage
    options is converted after loading); routing (use_muon) must match."""
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
        raise CheckpointError("MuonQ.load_state_dict: not an optimizer state dict (needs 'state' and 'param_groups')")
    saved_groups, state = state_dict["param_groups"], state_dict["state"]
    if not isinstance(state, dict) or not isinstance(saved_groups, (list, tuple)):
        raise CheckpointError(
            f"MuonQ.load_state_dict: 'state' must be a dict and 'param_groups' a list, got a "
            f"{type(state).__name__} and a {type(saved_groups).__name__}: the checkpoint is corrupt"
        )
    for g, saved in enumerate(saved_groups):
        if not isinstance(saved, dict) or not isinstance(saved.get("params"), (list, tuple)):
            raise CheckpointError(
                f"MuonQ.load_state_dict: param group {g} of the checkpoint is not a dict with a 'params' list: the "
                "checkpoint is corrupt"
            )
        if "use_muon" not in saved:
            raise CheckpointError(
                f"MuonQ.load_state_dict: param group {g} of the checkpoint has no 'use_muon': it was not saved by "
                "MuonQ (e.g. torch.optim.AdamW); start the optimizer fresh instead of loading it"
            )
    if len(saved_groups) != len(param_groups):
        raise CheckpointError(
            f"MuonQ.load_state_dict: the checkpoint has {len(saved_groups)} param groups, this optimizer "
            f"{len(param_groups)}: it was saved for another model or routing"
        )
    for g, (saved, group) in enumerate(zip(saved_groups, param_groups, strict=True)):
        if len(saved["params"]) != len(group["params"]):
            raise CheckpointError(
                f"MuonQ.load_state_dict: param group {g} has {len(saved['params'])} parameters in the checkpoint "
                f"and {len(group['params'])} here"
            )
        if saved["use_muon"] != group["use_muon"]:
            kind = {True: "Muon", False: "AdamW"}
            raise CheckpointError(
                f"MuonQ.load_state_dict: param group {g} is {kind[group['use_muon']]} here but "
                f"{kind[saved['use_muon']]} in the checkpoint: the routing changed"
            )
        options = {**defaults, **{k: v for k, v in saved.items() if k != "params"}}
        try:
            validate_group(options)
        except ValueError as err:
            raise CheckpointError(f"MuonQ.load_state_dict: param group {g} of the checkpoint: {err}") from None
        names = group.get("param_names") or [None] * len(group["params"])
        for i, (saved_id, p, name) in enumerate(zip(saved["params"], group["params"], names, strict=True)):
            entries = state.get(saved_id)
            if not entries:
                continue
            where = f"MuonQ.load_state_dict: parameter {name or f'{i} of group {g}'} of shape {tuple(p.shape)}"
            try:
                schema = state_schema(tuple(p.shape), options)  # the Kahan buffer (any dtype) is checked apart
            except ValueError as err:
                raise CheckpointError(f"{where}: the checkpoint's options do not fit it: {err}") from None
            keys = {k for k in entries if k not in ("zero_world_size", KAHAN)}
            if KAHAN in entries:  # a low-precision weight's compensation: kept where it is used, dropped elsewhere
                buffer = entries[KAHAN]
                dtype = buffer.dtype if torch.is_tensor(buffer) and buffer.is_floating_point() else torch.bfloat16
                _check_entry(where, KAHAN, buffer, tuple(p.shape), dtype)
            if keys != set(schema):
                missing, extra = sorted(set(schema) - keys), sorted(keys - set(schema))
                raise CheckpointError(f"{where}: state entries do not match (missing {missing}, unexpected {extra})")
            for key, (shape, dtype) in schema.items():
                _check_entry(where, key, entries[key], shape, dtype)


# ---------------------------------------------------------------------------------------- conversion
def storage_changes(saved: dict, group: dict) -> dict[str, tuple[Any, Any]]:
    """{option: (saved value, value now)} for the storage options that differ."""
    keys = MUON_STORAGE if group["use_muon"] else ADAMW_STORAGE
    norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731 - tuples come back as lists
    return {k: (saved[k], group[k]) for k in keys if norm(saved[k]) != norm(group[k])}


def encode_momentum(M: torch.Tensor, state: dict, plan: MatrixPlan, group: dict, index: int) -> None:
    """Store the momentum M (E, m, n) in ``state`` as the step would with ``group``'s options; the split's warm
    start is the keyed first-step Gaussian, so every rank and every resume encodes the same bits."""
    momentum = QuantizedMomentum(plan, group)
    for b in range(len(plan.batches)):
        X = plan.take(M, b)  # (E * c, rows, cols)
        norm = frobenius(X, no_reduction) if group["normalize"] else None
        X_bar = X / (norm + 1e-7) if group["normalize"] else X
        r, key = momentum.rank(b), ((index,) if b == 0 else (index, b))
        P = R = None
        if r:
            R0 = torch.randn((X.size(0), X.size(-1), r), generator=generator(group["seed"], *key), dtype=torch.float32)
            P, R = power_iteration_factors(X_bar, R0.to(X.device), dtype=momentum.product_dtype)
        pieces: dict = {}
        momentum.encode(pieces, X_bar, P, R, norm, (*key, 0))
        momentum.store(state, b, pieces)


def convert_state(p: torch.Tensor, state: dict, saved: dict, group: dict, index: int) -> dict:
    """The state of ``p`` saved with the options ``saved``, re-encoded with ``group``'s options."""
    if not state:
        return state
    kept = {KAHAN: state[KAHAN]} if KAHAN in state else {}  # the weight's compensation is not momentum: kept
    if not group["use_muon"]:
        shape = tuple(p.shape)
        was, now = adamw_quantized(shape, saved), adamw_quantized(shape, group)
        if was == now:
            return state
        out = {"step": state["step"], **kept}
        for key in ADAMW_MOMENTS:
            book = moment_codebook(key, p.device)
            if was:
                out[key] = dequantize_dynamic8(state[f"{key}_codes"], state[f"{key}_absmax"], book).view(shape)
            else:
                value = state[key].reshape(shape[0], -1).float()
                out[f"{key}_codes"], out[f"{key}_absmax"] = quantize_dynamic8(value, book, ADAMW_8BIT_BLOCK)
        return out
    M = QuantizedMomentum(plan_of(p, saved), saved).dequantized(state)  # (E, m, n) in the saved plan's view
    new_plan = plan_of(p, group)
    out = {"step": state["step"], **kept}
    encode_momentum(new_plan.view(M.reshape(p.shape)), out, new_plan, group, index)
    return out
