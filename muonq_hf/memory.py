"""Optimizer-state accounting, counted from the state tensors themselves (local shards under FSDP)."""

from __future__ import annotations

import math

import torch

KINDS = ("codes", "scales", "factors", "moments", "other")


def state_kind(key: str) -> str:
    """Kind of a MuonQ state entry: codes (residual / moment codes), scales, factors (P, R), moments (fp32)."""
    key = key.rsplit(".", 1)[-1]  # batch (b1.) and DeepSpeed (m3.) prefixes
    if key.endswith(("_scale", "_absmax")) or key == "norm":
        return "scales"
    if key.startswith(("P", "R")):
        return "factors"
    if key.endswith("_codes"):
        return "codes"
    if key in ("res", "exp_avg", "exp_avg_sq", "momentum_buffer"):
        return "moments"
    return "other"


def state_bytes(optimizer: torch.optim.Optimizer) -> dict[str, dict[str, int] | int]:
    """Bytes of every state tensor, split by group kind ("muon"/"adamw") and tensor kind.

    Returns {"muon": {kind: bytes, ..., "total": b}, "adamw": {...}, "total": b}. The step counters are
    "other". Works for any torch optimizer (groups without ``use_muon`` count as "adamw"). A tensor shared by
    several parameters' states (bitsandbytes' quantization maps) is counted once.
    """
    report: dict[str, dict[str, int]] = {g: {k: 0 for k in (*KINDS, "total")} for g in ("muon", "adamw")}
    seen: set[tuple[int, int]] = set()
    for group in optimizer.param_groups:
        part = report["muon" if group.get("use_muon") else "adamw"]
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if not torch.is_tensor(value):
                    continue
                local = value.to_local() if hasattr(value, "to_local") else value
                storage = (local.data_ptr(), local.numel())
                if local.numel() and storage in seen:
                    continue
                seen.add(storage)
                n = local.numel() * local.element_size()
                part[state_kind(key)] += n
                part["total"] += n
    return {**report, "total": report["muon"]["total"] + report["adamw"]["total"]}


def expected_state_bytes(shape: tuple[int, ...], group: dict) -> int:
    """Bytes MuonQ's state will hold for a parameter of ``shape`` in ``group`` (all options set), after a step.

    Counted from the state layout (``muonq_hf.matrices``, ``muonq_hf.momentum``) without running a step; equal
    to ``state_bytes`` of a stepped optimizer (tested), so the routing report can show it for any model.
    """
    from .codecs import packed_width
    from .lowrank import rank_for
    from .matrices import plan_of
    from .optimizer import ADAMW_8BIT_BLOCK, ADAMW_8BIT_MIN_NUMEL

    numel = math.prod(shape)
    step = 4  # the fp32 step counter
    if not group["use_muon"]:
        if group["adamw_bits"] == 8 and len(shape) >= 2 and numel >= ADAMW_8BIT_MIN_NUMEL:
            rows, cols = shape[0], numel // shape[0]
            return step + 2 * (numel + 4 * rows * -(-cols // ADAMW_8BIT_BLOCK))  # codes + fp32 absmax, m and v
        return step + 8 * numel
    plan = plan_of(torch.empty(shape, device="meta"), group)
    bits, total = group["bits"], step
    row_width = {"res": [], "P": []}
    for j in range(plan.k):
        rows, cols = plan.piece_shape(j)
        r = rank_for(rows, cols, group["rank_divisor"])
        row_width["res"].append(cols if bits == 32 else packed_width(cols, bits))
        row_width["P"].append(r if bits == 32 else packed_width(r, bits))
    item = 4 if bits == 32 else 1
    for widths in row_width.values():  # row entries: (E, m, W)
        if any(widths):
            total += plan.experts * plan.m * plan.row_width(widths) * item
    for count, rows, cols in plan.matrices():  # batch entries, per matrix
        r = rank_for(rows, cols, group["rank_divisor"])
        if bits == 32:
            total += count * cols * r * 4  # R
        else:
            if group["block_size"] is None:
                total += count * 2  # fp16 residual scale
            else:  # blockwise scales are row entries of (rows, ceil(cols / block)) fp16 per matrix
                total += count * rows * -(-cols // group["block_size"]) * 2
            if r:
                total += count * (cols * packed_width(r, bits) + 2 * r * 2)  # R codes, P and R column scales
        if group["store_norm"] and group["normalize"]:
            total += count * 4
    return total
