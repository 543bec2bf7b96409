"""Floating-point quantization lab: Adam vs Muon with quantized G, W, M, V (arXiv 2510.21314, docs/fp_quantization.md).

    python -m fplab rosenbrock|mlp|errgrowth|all [--out DIR] [--steps N] [--seeds K] [--quick]
                           [--rounding nearest|stochastic] [--workers W]

Experiments (all CPU, fp32; the exponent is fixed at 8 bits, bf16's range, so only the mantissa varies and
nothing over- or underflows; M = 23 is then exactly fp32, i.e. the exact run):

- ``rosenbrock``: f(x, y) = (1 - x)^2 + 100 (y - x^2)^2 from (-1.5, 2) + 0.25 N(0, I) per seed, 1500 steps.
- ``mlp``: a 64-64-64-10 ReLU net on scikit-learn's ``load_digits`` (1437 train / 360 test), batch 64,
  500 steps. Both sweeps decay the lr linearly to 0.
- both sweep the mantissa bits over {23, 10, 7, 3, 2, 1} for all components together ("all") and for one
  at a time (G, W, M, V; Muon has no V), several seeds, and plot the loss against the step.
- ``errgrowth``: the accumulated quantization error. Exact and quantized (all components at e8m10, e8m7)
  runs from the same start with deterministic gradients (the MLP: full batch of 256 examples) and a
  constant lr: the relative deviation ||W_q(T) - W(T)|| / ||W(T)||, T = 16..1024, is fitted against
  log T and against a power law T^p. A second series uses the paper's horizon rule (mantissa ~ k log2 T).

Seeds are batched: parameters carry a leading seed axis, Adam is elementwise and Muon orthogonalizes each
seed's matrix on its own (``fpquant.as_matrices``: ndim >= 3 is a batch), so S seeds are S independent runs.
Muon is used for every tensor: a bias (1, n) is a row matrix (its polar factor is its direction), and the
Rosenbrock point is a (1, 2) row, so Muon there is normalized-momentum descent.
"""

from __future__ import annotations

import argparse
import csv
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from fplab.fpquant import QuantizedAdam, QuantizedMuon, horizon_formats

MANTISSAS = (23, 10, 7, 3, 2, 1)
EXP_BITS = 8
COMPONENTS = {"adam": ("all", "G", "W", "M", "V"), "muon": ("all", "G", "W", "M")}
FULL_BATCH = 256  # errgrowth's MLP: full-batch gradient descent on the first 256 training examples
# Learning rates tuned once on the exact (fp32) runs, then shared by every format.
LR = {"rosenbrock": {"adam": 0.2, "muon": 0.05}, "mlp": {"adam": 1e-2, "muon": 1e-2}}


@dataclass
class Config:
    steps: int
    seeds: int
    mantissas: tuple[int, ...] = MANTISSAS
    log_points: int = 50
    rounding: str = "nearest"
    decay: bool = True  # lr decays linearly to 0 over the run (sweeps); constant for errgrowth


# --- problems --------------------------------------------------------------------------------------------


def rosenbrock(xy: torch.Tensor) -> torch.Tensor:
    """f(x, y) = (1 - x)^2 + 100 (y - x^2)^2 over the last dim; minimum 0 at (1, 1)."""
    x, y = xy[..., 0], xy[..., 1]
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


def rosenbrock_init(seeds: int) -> list[torch.Tensor]:
    starts = [torch.tensor([-1.5, 2.0]) + 0.25 * torch.randn(2, generator=torch.Generator().manual_seed(s))
              for s in range(seeds)]
    return [torch.stack(starts).view(seeds, 1, 2).requires_grad_()]


class Digits:
    """scikit-learn's 8x8 digits (ships with the package), pixels scaled to [0, 1], fixed 80/20 split."""

    def __init__(self) -> None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        X, y = load_digits(return_X_y=True)
        Xtr, Xte, ytr, yte = train_test_split(X / 16.0, y, test_size=0.2, random_state=0, stratify=y)
        self.Xtr, self.Xte = torch.tensor(Xtr, dtype=torch.float32), torch.tensor(Xte, dtype=torch.float32)
        self.ytr, self.yte = torch.tensor(ytr), torch.tensor(yte)


@lru_cache(maxsize=1)
def digits() -> Digits:
    return Digits()


def mlp_init(seeds: int, sizes: tuple[int, ...] = (64, 64, 64, 10)) -> list[torch.Tensor]:
    """Per-seed weights (S, in, out) ~ U(+-1/sqrt(in)) like nn.Linear, and zero biases (S, 1, out)."""
    params = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
        bound = 1 / math.sqrt(fan_in)
        gens = [torch.Generator().manual_seed(1000 * s + fan_out) for s in range(seeds)]
        W = torch.stack([torch.empty(fan_in, fan_out).uniform_(-bound, bound, generator=g) for g in gens])
        params += [W.requires_grad_(), torch.zeros(seeds, 1, fan_out, requires_grad=True)]
    return params


def mlp_logits(params: list[torch.Tensor], X: torch.Tensor) -> torch.Tensor:
    """X (S, B, 64) -> logits (S, B, 10)."""
    h = X
    for i in range(0, len(params), 2):
        h = torch.baddbmm(params[i + 1], h, params[i])
        if i + 2 < len(params):
            h = torch.relu(h)
    return h


def mlp_loss(params: list[torch.Tensor], X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-seed mean cross-entropy, shape (S,)."""
    logits = mlp_logits(params, X)
    return F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(dim=1)


# --- one run ---------------------------------------------------------------------------------------------


def component_formats(optimizer: str, component: str, man_bits: int) -> dict[str, tuple[int, int] | None]:
    """Formats for a sweep cell: every component ("all") or one of G, W, M, V at (EXP_BITS, man_bits)."""
    names = ("G", "W", "M", "V") if optimizer == "adam" else ("G", "W", "M")
    fmt = (EXP_BITS, man_bits)
    return {c.lower(): fmt if component in ("all", c) else None for c in names}


def make_optimizer(optimizer: str, params: list[torch.Tensor], lr: float, rounding: str = "nearest",
                   seed: int = 0, **formats) -> torch.optim.Optimizer:
    if optimizer == "adam":
        return QuantizedAdam(params, lr=lr, rounding=rounding, seed=seed, **formats)
    if optimizer == "muon":
        return QuantizedMuon(params, lr=lr, rounding=rounding, seed=seed, **formats)
    raise ValueError(f"optimizer must be 'adam' or 'muon', got {optimizer!r}")


def run(task: str, optimizer: str, formats: dict, cfg: Config, lr: float | None = None,
        full_batch: bool = False, track: list[int] | None = None) -> dict:
    """Train ``cfg.seeds`` seeds for ``cfg.steps`` steps. Returns logged steps, per-seed loss curves (L, S),
    final per-seed metrics and, at the steps in ``track``, the flattened per-seed parameters and losses."""
    lr = LR[task][optimizer] if lr is None else lr
    data = digits() if task == "mlp" else None
    params = rosenbrock_init(cfg.seeds) if task == "rosenbrock" else mlp_init(cfg.seeds)
    opt = make_optimizer(optimizer, params, lr, cfg.rounding, **formats)
    gens = [torch.Generator().manual_seed(s) for s in range(cfg.seeds)]
    every = max(1, cfg.steps // cfg.log_points)
    track = set(track or [])
    steps, curve, snapshots, track_loss = [], [], {}, {}

    # The MLP's training set: all of it, or with full_batch (errgrowth) the fixed subset it descends on.
    if task == "mlp":
        n = FULL_BATCH if full_batch else len(data.ytr)
        X_train, y_train = data.Xtr[:n].expand(cfg.seeds, -1, -1), data.ytr[:n].expand(cfg.seeds, -1)

    def full_loss() -> torch.Tensor:  # per seed, over the whole training set
        with torch.no_grad():
            if task == "rosenbrock":
                return rosenbrock(params[0]).view(-1)
            return mlp_loss(params, X_train, y_train)

    for t in range(cfg.steps + 1):
        if t % every == 0 or t == cfg.steps:
            steps.append(t)
            curve.append(full_loss())
        if t in track:
            snapshots[t] = torch.cat([p.detach().reshape(cfg.seeds, -1) for p in params], dim=1).clone()
            track_loss[t] = full_loss()
        if t == cfg.steps:
            break
        if cfg.decay:  # normalized updates (Muon) only settle into a minimum when the lr goes to 0
            for group in opt.param_groups:
                group["lr"] = lr * (1 - t / cfg.steps)
        opt.zero_grad(set_to_none=True)
        if task == "rosenbrock":
            loss = rosenbrock(params[0]).sum()
        elif full_batch:  # deterministic gradients, so that rounding is the only difference between runs
            loss = mlp_loss(params, X_train, y_train).sum()
        else:
            idx = torch.stack([torch.randint(len(data.ytr), (64,), generator=g) for g in gens])
            loss = mlp_loss(params, data.Xtr[idx], data.ytr[idx]).sum()
        loss.backward()
        opt.step()

    out = {"steps": steps, "curve": torch.stack(curve), "snapshots": snapshots, "track_loss": track_loss,
           "final_loss": curve[-1]}
    if task == "rosenbrock":
        xy = params[0].detach().clone().requires_grad_()
        rosenbrock(xy).sum().backward()
        out["final_metric"] = xy.grad.view(cfg.seeds, 2).norm(dim=1)  # ||grad f|| at the last iterate
    else:
        with torch.no_grad():
            logits = mlp_logits(params, data.Xte.expand(cfg.seeds, -1, -1))
            out["final_metric"] = (logits.argmax(-1) == data.yte).float().mean(dim=1)  # test accuracy
    return out


# --- sweeps ----------------------------------------------------------------------------------------------


def _run_job(job: tuple) -> dict:
    args, kwargs = job
    return run(*args, **kwargs)


def run_all(jobs: list[tuple], workers: int) -> list[dict]:
    """``run`` over independent jobs, in order; on ``workers`` processes with one torch thread each (the
    tensors are tiny: processes use the cores better than intra-op threads)."""
    if workers <= 1:
        return [_run_job(job) for job in jobs]
    # spawn, not fork: forking a process whose OpenMP pool has started can deadlock.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, ctx, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        return list(pool.map(_run_job, jobs))


def sweep(task: str, cfg: Config, out: Path, workers: int = 1) -> list[dict]:
    """Every (optimizer, component, mantissa) cell; M = 23 reuses the exact run (rounding to e8m23 is the
    identity on fp32, checked in the tests)."""
    cells = [(opt, c, bits) for opt in ("adam", "muon") for c in COMPONENTS[opt] for bits in cfg.mantissas]
    jobs = {(opt, "exact"): ((task, opt, {}, cfg), {}) for opt in ("adam", "muon")}
    for opt, comp, bits in cells:
        if bits != 23:
            jobs[(opt, comp, bits)] = ((task, opt, component_formats(opt, comp, bits), cfg), {})
    results = dict(zip(jobs, run_all(list(jobs.values()), workers), strict=True))
    rows, curves = [], []
    metric = "grad_norm" if task == "rosenbrock" else "test_acc"
    for opt, comp, bits in cells:
        res = results[(opt, "exact") if bits == 23 else (opt, comp, bits)]
        initial = res["curve"][0]
        for s in range(cfg.seeds):
            final = float(res["final_loss"][s])
            rows.append({"task": task, "optimizer": opt, "component": comp, "man_bits": bits, "seed": s,
                         "final_loss": final, metric: float(res["final_metric"][s]),
                         "diverged": int(not math.isfinite(final) or final > float(initial[s]))})
        for i, t in enumerate(res["steps"]):
            for s in range(cfg.seeds):
                curves.append((task, opt, comp, bits, s, t, float(f"{res['curve'][i, s]:.4g}")))
    write_csv(out / f"{task}.csv", rows)
    fields = ("task", "optimizer", "component", "man_bits", "seed", "step", "loss")
    write_csv(out / f"{task}_curves.csv", [dict(zip(fields, c, strict=True)) for c in curves])
    plot_sweep(task, curves, cfg, out / f"{task}.png")
    return rows


def median(xs: list[float]) -> float:
    xs = sorted(x if math.isfinite(x) else math.inf for x in xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def sweep_table(task: str, rows: list[dict], cfg: Config) -> str:
    """Markdown: median final loss over seeds (and the task metric), '(k/S div)' when seeds diverged."""
    metric = "grad_norm" if task == "rosenbrock" else "test_acc"
    lines = [f"| {task} | component | " + " | ".join(f"M={b}" for b in cfg.mantissas) + " |",
             "|---|---|" + "---|" * len(cfg.mantissas)]
    for optimizer in ("adam", "muon"):
        for component in COMPONENTS[optimizer]:
            cells = []
            for bits in cfg.mantissas:
                key = (optimizer, component, bits)
                sel = [r for r in rows if (r["optimizer"], r["component"], r["man_bits"]) == key]
                loss = median([r["final_loss"] for r in sel])
                extra = f"{median([r[metric] for r in sel]):.3g}" if metric == "test_acc" else ""
                cell = f"{loss:.3g}" + (f" / {extra}" if extra else "")
                div = sum(r["diverged"] for r in sel)
                cells.append(cell + (f" ({div}/{len(sel)} div)" if div else ""))
            lines.append(f"| {optimizer} | {component} | " + " | ".join(cells) + " |")
    what = "median final f(x, y)" if task == "rosenbrock" else "median final train loss / test accuracy"
    head = f"{what} over {cfg.seeds} seeds, {cfg.steps} steps, E = {EXP_BITS}, {cfg.rounding} rounding"
    return head + "\n\n" + "\n".join(lines)


# --- error growth ----------------------------------------------------------------------------------------


def fit_log_and_power(T: list[int], dev: list[float]) -> dict:
    """Least squares dev = a + b ln T (with R^2) and ln dev = c + p ln T (the power-law exponent p, R^2)."""
    def linfit(x: list[float], y: list[float]) -> tuple[float, float, float]:
        n = len(x)
        mx, my = sum(x) / n, sum(y) / n
        sxx = sum((a - mx) ** 2 for a in x)
        b = sum((a - mx) * (c - my) for a, c in zip(x, y, strict=True)) / sxx
        a0 = my - b * mx
        ss_res = sum((c - a0 - b * a) ** 2 for a, c in zip(x, y, strict=True))
        ss_tot = sum((c - my) ** 2 for c in y) or 1e-300
        return a0, b, 1 - ss_res / ss_tot

    pairs = [(t, d) for t, d in zip(T, dev, strict=True) if math.isfinite(d) and d > 0]
    if len(pairs) < 3:
        return {"log_slope": math.nan, "log_r2": math.nan, "power": math.nan, "power_r2": math.nan}
    lt = [math.log(t) for t, _ in pairs]
    _, b, r2 = linfit(lt, [d for _, d in pairs])
    _, p, r2p = linfit(lt, [math.log(d) for _, d in pairs])
    return {"log_slope": b, "log_r2": r2, "power": p, "power_r2": r2p}


def errgrowth(cfg: Config, out: Path, workers: int = 1) -> list[dict]:
    """Deviation of quantized from exact trajectories against the horizon T (constant lr, same start and,
    for the MLP, full-batch gradients, so the only difference between the two runs is rounding)."""
    T_max = cfg.steps
    grid = sorted({round(2 ** (k / 2)) for k in range(8, 2 * int(math.log2(T_max)) + 1)} | {T_max})
    grid = [t for t in grid if t <= T_max]
    rule_grid = [t for t in grid if t & (t - 1) == 0]  # powers of two
    jobs = {}
    for task in ("rosenbrock", "mlp"):
        for opt in ("adam", "muon"):
            kw = {"full_batch": True, "track": grid}
            jobs[(task, opt, "exact")] = ((task, opt, {}, cfg), kw)
            # Fixed formats: one run to T_max gives the deviation at every horizon T on the grid.
            for bits in (10, 7):
                fmts = component_formats(opt, "all", bits)
                jobs[(task, opt, f"e{EXP_BITS}m{bits}")] = ((task, opt, fmts, cfg), kw)
            # The horizon rule: a run per T with the formats the theory asks for at that T (~ k log2 T bits).
            for t in rule_grid:
                fmts = {c.lower(): f for c, f in horizon_formats(t, opt, EXP_BITS).items()}
                cfg_t = Config(t, cfg.seeds, rounding=cfg.rounding, decay=False)
                kw_t = {"full_batch": True, "track": [t]}
                jobs[(task, opt, "horizon rule", t)] = ((task, opt, fmts, cfg_t), kw_t)
    results = dict(zip(jobs, run_all(list(jobs.values()), workers), strict=True))

    def row(key: tuple, t: int, bits: str) -> dict:
        task, opt, precision = key[:3]
        exact, res = results[(task, opt, "exact")], results[key]
        w, w_exact = res["snapshots"][t], exact["snapshots"][t]
        return {"task": task, "optimizer": opt, "precision": precision, "T": t, "man_bits": bits,
                "deviation": median(((w - w_exact).norm(dim=1) / w_exact.norm(dim=1)).tolist()),
                "loss": median(res["track_loss"][t].tolist()),
                "exact_loss": median(exact["track_loss"][t].tolist())}

    rows = []
    for key in results:
        if key[2] == "horizon rule":
            fmts = horizon_formats(key[3], key[1], EXP_BITS)
            rows.append(row(key, key[3], "/".join(f"{c}{f.man_bits}" for c, f in fmts.items())))
        elif key[2] != "exact":
            rows += [row(key, t, key[2].split("m")[-1]) for t in grid]
    write_csv(out / "errgrowth.csv", rows)
    plot_errgrowth(rows, out / "errgrowth.png")
    return rows


def _series(rows: list[dict], task: str, optimizer: str, precision: str) -> list[dict]:
    key = (task, optimizer, precision)
    sel = [r for r in rows if (r["task"], r["optimizer"], r["precision"]) == key]
    return sorted(sel, key=lambda r: r["T"])


def errgrowth_table(rows: list[dict]) -> str:
    """Markdown: deviation at the smallest and largest T, and both fits, per (task, optimizer, precision)."""
    lines = ["| task | optimizer | precision | dev at T=min | dev at T=max | a + b ln T: b, R^2 "
             "| T^p: p, R^2 | loss at T=max (exact) |",
             "|---|---|---|---|---|---|---|---|"]
    for key in dict.fromkeys((r["task"], r["optimizer"], r["precision"]) for r in rows):
        sel = _series(rows, *key)
        fit = fit_log_and_power([r["T"] for r in sel], [r["deviation"] for r in sel])
        first, last = sel[0], sel[-1]
        lines.append(f"| {' | '.join(key)} | {first['deviation']:.3g} (T={first['T']}) "
                     f"| {last['deviation']:.3g} (T={last['T']}) "
                     f"| {fit['log_slope']:.3g}, {fit['log_r2']:.2f} "
                     f"| {fit['power']:.2f}, {fit['power_r2']:.2f} "
                     f"| {last['loss']:.3g} ({last['exact_loss']:.3g}) |")
    head = "median over seeds of ||W_q(T) - W(T)|| / ||W(T)||, constant lr, exact = fp32"
    return head + "\n\n" + "\n".join(lines)


# --- output ----------------------------------------------------------------------------------------------


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display: write files only
    import matplotlib.pyplot as plt

    return plt


def plot_sweep(task: str, curves: list[tuple], cfg: Config, path: Path) -> None:
    """Rows: optimizer; columns: which component is quantized; one line per mantissa (median over seeds)."""
    plt = _pyplot()
    cols = COMPONENTS["adam"]
    fig, axes = plt.subplots(2, len(cols), figsize=(4 * len(cols), 7), sharex=True, sharey=True)
    cmap = plt.get_cmap("viridis")
    for i, optimizer in enumerate(("adam", "muon")):
        for j, component in enumerate(cols):
            ax = axes[i, j]
            ax.set_title(f"{optimizer}, {'all' if component == 'all' else component + ' only'} quantized")
            if component not in COMPONENTS[optimizer]:
                ax.text(0.5, 0.5, "Muon has no V", ha="center", transform=ax.transAxes)
                ax.tick_params(labelleft=False)
                continue
            for k, bits in enumerate(cfg.mantissas):
                sel = [c for c in curves if c[1:4] == (optimizer, component, bits)]
                steps = sorted({c[5] for c in sel})
                by_step = {t: [c[6] for c in sel if c[5] == t] for t in steps}
                y = [median(by_step[t]) for t in steps]
                ax.plot(steps, y, color=cmap(k / max(1, len(cfg.mantissas) - 1)), label=f"M={bits}")
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
            if i == 1:
                ax.set_xlabel("step")
            if j == 0:
                ax.set_ylabel("f(x, y)" if task == "rosenbrock" else "train loss (full set)")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"{task}: median over {cfg.seeds} seeds, e{EXP_BITS}mM formats, {cfg.rounding} rounding")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_errgrowth(rows: list[dict], path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), squeeze=False)
    for j, task in enumerate(("rosenbrock", "mlp")):
        ax = axes[0, j]
        keys = dict.fromkeys((r["optimizer"], r["precision"]) for r in rows if r["task"] == task)
        for optimizer, precision in keys:
            sel = _series(rows, task, optimizer, precision)
            style = "-" if optimizer == "adam" else "--"
            marker = "o" if precision == "horizon rule" else None
            ax.plot([r["T"] for r in sel], [r["deviation"] for r in sel], style, marker=marker,
                    label=f"{optimizer} {precision}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("horizon T (steps)")
        ax.set_ylabel("||W_q(T) - W(T)|| / ||W(T)||")
        ax.set_title(f"{task}: deviation from the exact run")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --- CLI -------------------------------------------------------------------------------------------------

DEFAULTS = {"rosenbrock": 1500, "mlp": 500, "errgrowth": 1024}
QUICK = {"rosenbrock": 20, "mlp": 10, "errgrowth": 32}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fplab", description=__doc__.splitlines()[0])
    parser.add_argument("experiment", choices=["rosenbrock", "mlp", "errgrowth", "all"])
    parser.add_argument("--out", type=Path, default=Path("fp_quantization_lab"), help="output directory")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (errgrowth: the largest T)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per run (default 3, quick 1)")
    parser.add_argument("--rounding", choices=["nearest", "stochastic"], default="nearest")
    parser.add_argument("--quick", action="store_true", help="tiny run for tests (seconds)")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes (default: min(2, CPUs); 1 with --quick)")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.seeds is not None and args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    workers = args.workers or (1 if args.quick else min(2, os.cpu_count() or 1))

    args.out.mkdir(parents=True, exist_ok=True)
    # One intra-op thread: these tensors are tiny, and OpenMP threads only spin (badly, on a busy machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _main(args, workers)
    finally:
        torch.set_num_threads(threads)
    return 0


def _main(args: argparse.Namespace, workers: int) -> None:
    experiments = ["rosenbrock", "mlp", "errgrowth"] if args.experiment == "all" else [args.experiment]
    seeds = args.seeds or (1 if args.quick else 3)
    tables = []
    for name in experiments:
        start = time.perf_counter()
        steps = args.steps or (QUICK if args.quick else DEFAULTS)[name]
        cfg = Config(steps, seeds, (23, 2) if args.quick else MANTISSAS, rounding=args.rounding,
                     decay=name != "errgrowth")
        if name == "errgrowth":
            table = errgrowth_table(errgrowth(cfg, args.out, workers))
        else:
            table = sweep_table(name, sweep(name, cfg, args.out, workers), cfg)
        tables.append(f"### {name}\n\n{table}\n\n({time.perf_counter() - start:.0f} s)\n")
        print(tables[-1], flush=True)
    (args.out / f"tables_{args.experiment}.md").write_text("\n".join(tables))


if __name__ == "__main__":
    sys.exit(main())
