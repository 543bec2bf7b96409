"""Optimizer-state accounting, counted from the state tensors themselves (local shards under FSDP)."""

from __future__ import annotations

import math

import torch

from .state import state_schema
from .weights import KAHAN

KINDS = ("codes", "scales", "factors", "moments", "compensation", "other")


def state_kind(key: str) -> str:
    """Kind of a MuonQ state entry: codes (residual / moment codes), scales, factors (P, R), moments (fp32),
    compensation (a low-precision weight's Kahan buffer, ``muonq_hf.weights``)."""
    key = key.rsplit(".", 1)[-1]  # batch (b1.) and DeepSpeed (m3.) prefixes
    if key == KAHAN:
        return "compensation"
    if key.endswith(("_scale", "_absmax")) or key == "norm":
        return "scales"
    if key.startswith(("P", "R")):
        return "factors"
    if key.endswith("_codes"):
        return "codes"
    if key in ("res", "exp_avg", "exp_avg_sq", "momentum_buffer"):
        return "moments"
    return "other"


def _storages(value: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors that hold ``value``: a DTensor's local shard, a wrapper subclass's inner tensors
    (torchao's 4/8-bit optimizer states: codes, scales, map), else the tensor itself."""
    if hasattr(value, "to_local"):
        return [value.to_local()]
    if type(value) is not torch.Tensor and hasattr(value, "__tensor_flatten__"):
        names, _ = value.__tensor_flatten__()
        return [t for name in names for t in _storages(getattr(value, name))]
    return [value]


def state_bytes(optimizer: torch.optim.Optimizer) -> dict[str, dict[str, int] | int]:
    """Bytes of every state tensor, split by group kind ("muon"/"adamw") and tensor kind.

    Returns {"muon": {kind: bytes, ..., "total": b}, "adamw": {...}, "total": b}. The step counters are
    "other". Works for any torch optimizer (groups without ``use_muon`` count as "adamw"), tensor subclasses
    included (their inner tensors are counted). A tensor shared by several parameters' states (bitsandbytes'
    and torchao's quantization maps) is counted once.
    """
    report: dict[str, dict[str, int]] = {g: {k: 0 for k in (*KINDS, "total")} for g in ("muon", "adamw")}
    seen: set[tuple[int, int]] = set()
    for group in optimizer.param_groups:
        part = report["muon" if group.get("use_muon") else "adamw"]
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if not torch.is_tensor(value):
                    continue
                for local in _storages(value):
                    storage = (local.data_ptr(), local.numel())
                    if local.numel() and storage in seen:
                        continue
                    seen.add(storage)
                    n = local.numel() * local.element_size()
                    part[state_kind(key)] += n
                    part["total"] += n
    return {**report, "total": report["muon"]["total"] + report["adamw"]["total"]}


def expected_state_bytes(shape: tuple[int, ...], group: dict, dtype: torch.dtype = torch.float32) -> int:
    """Bytes MuonQ's state will hold for a parameter of ``shape`` and ``dtype`` in ``group`` (all options set),
    after a step.

    Counted from the state schema (``muonq_hf.state.state_schema``) without running a step; equal to
    ``state_bytes`` of a stepped optimizer (tested), so the routing report can show it for any model.
    """
    return sum(math.prod(s) * d.itemsize for s, d in state_schema(shape, group, dtype).values())
