"""Optimizer step time: every row on one model in one process, interleaved, median of repeated steps.

Rows are interleaved round-robin (one step of each row per round, the order rotated every round) so that
load from other processes on a shared machine hits all rows alike; each row's time is the median over
rounds after warm-up. On CPU the ratios use the process CPU time of each step (``time.process_time``; with
one torch thread that is the step's own work), because wall time on a CPU shared with other jobs swings by
3x from one step to the next; wall times are reported beside it. On CUDA the time is wall time after a sync.
``stage_profile`` splits one MuonQ matrix step into its stages to show where the time goes relative to
plain Muon.
"""

from __future__ import annotations

import statistics
import time

import torch

from muonq_hf.lowrank import no_reduction, power_iteration_factors, rank_for
from muonq_hf.matrices import plan_of
from muonq_hf.momentum import _normalized_update_fused, momentum_step
from muonq_hf.options import DEFAULTS
from muonq_hf.orthogonalize import zeropower_via_newtonschulz5
from muonq_hf.state import QuantizedMomentum

from .models import build_model
from .variants import SPEED_ROWS, Variant, make_optimizer

RATIO_REFERENCES = ("torch_muon", "muon_fp32", "adamw")
NS_BF16 = "Newton-Schulz 5, bf16 (the default, as torch.optim.Muon)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_times(
    shape: str, variants: list[Variant] = SPEED_ROWS, warmup: int = 2, rounds: int = 7, device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict:
    """{variant: {"median_s", "min_s", "max_s", "wall_median_s"}} plus ratios to torch.optim.Muon + AdamW (what a
    Muon user runs today), the package's fp32 Muon and torch AdamW, for the rows that are present.

    ``median_s`` etc. are CPU time on CPU and wall time on CUDA.
    """
    dev = torch.device(device)
    model = build_model(shape, device=dev, dtype=dtype)
    gen = torch.Generator(device=dev).manual_seed(0)
    for p in model.parameters():  # fixed gradients: the step cost does not depend on their values
        p.grad = (torch.randn(p.shape, generator=gen, device=dev) * 1e-2).to(dtype)
    optimizers = {v.name: make_optimizer(v, model, lr=1e-4) for v in variants}
    for _ in range(warmup):
        for opt in optimizers.values():
            opt.step()
    _sync(dev)
    clock = time.perf_counter if dev.type == "cuda" else time.process_time
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    walls: dict[str, list[float]] = {v.name: [] for v in variants}
    names = list(optimizers)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0, w0 = clock(), time.perf_counter()
            optimizers[name].step()
            _sync(dev)
            times[name].append(clock() - t0)
            walls[name].append(time.perf_counter() - w0)
    rows = {}
    for v in variants:
        t = times[v.name]
        rows[v.name] = {
            "label": v.label, "median_s": statistics.median(t), "min_s": min(t), "max_s": max(t),
            "wall_median_s": statistics.median(walls[v.name]),
        }
    for ref in RATIO_REFERENCES:
        if ref in rows:
            for row in rows.values():
                row[f"ratio_vs_{ref}"] = row["median_s"] / rows[ref]["median_s"]
    n_params = sum(p.numel() for p in model.parameters())
    timer = "wall time (cuda sync)" if dev.type == "cuda" else "process CPU time"
    return {"shape": shape, "device": device, "dtype": str(dtype).removeprefix("torch."), "timer": timer,
            "params": n_params, "warmup": warmup, "rounds": rounds,
            "rows": rows}


def stage_profile(m: int, n: int, rank_divisor: int = 16, repeats: int = 5, seed: int = 0) -> dict[str, float]:
    """Median CPU seconds of the stages of one default MuonQ matrix step (m, n), and of Newton-Schulz.

    The first row is the momentum stage as the optimizer runs it (``momentum_step``: decode, normalize, split,
    encode, with the fused kernels when compiling is on); the next rows split it into its parts with the same
    functions and dtypes (bf16 inputs for the split's row-wise products); "work above NS" is the first row over
    the default bf16 Newton-Schulz.
    """
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(1, m, n, generator=gen)
    group = {**DEFAULTS, "use_muon": True, "rank_divisor": rank_divisor}
    plan = plan_of(torch.empty(m, n, device="meta"), group)
    momentum = QuantizedMomentum(plan, group)
    state: dict = {}
    momentum_step(plan, G, state, group, 0)  # a state to decode
    pieces = momentum.load(state, 0)
    M_bar = G / G.norm()
    R = torch.randn(1, n, rank_for(m, n, group["rank_divisor"]), generator=gen)
    dtype = momentum.product_dtype
    P, R = power_iteration_factors(M_bar, R, dtype=dtype)
    res, low_rank, _, _ = momentum.decode_parts(pieces, 0)
    update = (G, res, low_rank, None, 0.95, True, False, dtype, torch.bfloat16, no_reduction)

    stages = {
        "momentum stage (momentum_step, as the optimizer runs it)": lambda: momentum_step(plan, G, state, group, 0),
        "  decode (res codes, P, R) and P R^T": lambda: momentum.decode_parts(pieces, 0),
        "  M = beta (res + P R^T) + G/||G||, normalized": lambda: _normalized_update_fused(*update),
        "  power-iteration factors (M Q, QR, R = M^T P)": lambda: power_iteration_factors(M_bar, R, dtype=dtype),
        "  encode (res = M - P R^T, P, R)": lambda: momentum.encode({}, M_bar, P, R, None, (0, 0)),
        NS_BF16: lambda: zeropower_via_newtonschulz5(M_bar),
        "Newton-Schulz 5, fp32 (ns_dtype='fp32')": lambda: zeropower_via_newtonschulz5(M_bar, dtype=torch.float32),
        "plain Muon momentum (beta M + G)": lambda: 0.95 * M_bar + G,
    }
    out = {}
    for name, fn in stages.items():
        fn = torch.no_grad()(fn)  # as the optimizer's step runs them
        fn()
        t = []
        for _ in range(repeats):
            t0 = time.process_time()
            fn()
            t.append(time.process_time() - t0)
        out[name] = statistics.median(t)
    out["work above NS / bf16 NS"] = out["momentum stage (momentum_step, as the optimizer runs it)"] / out[NS_BF16]
    return out
