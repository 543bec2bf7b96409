"""Quality study: pretrain tiny GPT-2 / LLaMA models through the HF Trainer with each optimizer row.

Every run is ``examples/run_clm.py`` in its own process (``--optim muonq --optim_args ...`` for the Muon
family, ``adamw_torch`` / ``adamw_bnb_8bit`` for the AdamW family) on the embedded corpus, with the same
schedule. The study runs in phases: an lr grid per family on seed 0, then every row at its family's best lr
on ``seeds``. Results are cached per run in ``benchmarks/results/quality_runs.json`` (a finished run is never
re-run) and each run checkpoints every ``eval_steps`` under ``runs/bench_quality/`` (an interrupted run
resumes from its last checkpoint), so the whole study can be stopped and restarted at any time.
"""

from __future__ import annotations

import fcntl
import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .variants import ABLATION_ROWS, MAIN_ROWS, Variant

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
CACHE = RESULTS / "quality_runs.json"
RUN_DIR = ROOT / "runs" / "bench_quality"

# Same schedule for every run. Tiny models so that the study fits a shared 2-core CPU (~1 min per run).
SCHEDULE = dict(
    n_layer=2, n_embd=128, n_head=4, block_size=128, max_steps=200, per_device_train_batch_size=8,
    warmup_steps=10, lr_scheduler_type="cosine", eval_steps=50, max_eval_samples=256, weight_decay=0.0,
)
LR_GRID = {"muon": (0.01, 0.02, 0.04), "adamw": (0.001, 0.003, 0.01)}
MAX_GRID_EXTENSIONS = 2
GRID_PROBE = {"muon": "muon_fp32", "adamw": "adamw"}  # the row whose lr sweep sets its family's lr
QUALITY_MAIN = [v for v in MAIN_ROWS if v.name != "muon_bf16"]  # Muon bf16 has no --optim name
CORE_ROWS = ("muon_fp32", "muonq", "naive4", "adamw", "bnb_adamw8bit")  # the rows of the quality targets
LLAMA_ROWS = ("muon_fp32", "muonq", "muonq_adam8", "naive4", "adamw", "bnb_adamw8bit")
MODELS = ("gpt2", "llama")  # each with its own lr grid
OPTIM_ARGS_ORDER = ("bits", "normalize", "rank_divisor", "mu", "block_size", "store_norm", "stochastic_rounding",
                    "adamw_bits", "ns_coefficients", "weight_update")


@dataclass(frozen=True)
class Run:
    model: str  # "gpt2" or "llama"
    variant: Variant
    lr: float
    seed: int

    @property
    def key(self) -> str:
        return f"{self.model}/{self.variant.name}/lr{self.lr:g}/s{self.seed}"


def optim_flags(variant: Variant) -> list[str]:
    """The Trainer flags that select ``variant``."""
    if variant.kind == "adamw":
        return ["--optim", "adamw_torch"]
    if variant.kind == "bnb":
        return ["--optim", "adamw_bnb_8bit"]
    if variant.kind != "muonq":
        raise ValueError(f"variant {variant.name!r} ({variant.kind}) has no Trainer --optim name")
    items = [f"{k}={str(variant.options[k]).lower()}" for k in OPTIM_ARGS_ORDER if k in variant.options]
    return ["--optim", "muonq"] + (["--optim_args", ",".join(items)] if items else [])


def command(run: Run, output_dir: Path, resume: Path | None = None) -> list[str]:
    """The exact ``run_clm.py`` command line of one run (adam betas 0.9/0.95 for every row)."""
    s = SCHEDULE
    cmd = [
        sys.executable, str(ROOT / "examples" / "run_clm.py"), *optim_flags(run.variant),
        "--model_type", run.model, "--n_layer", str(s["n_layer"]), "--n_embd", str(s["n_embd"]),
        "--n_head", str(s["n_head"]), "--block_size", str(s["block_size"]), "--max_steps", str(s["max_steps"]),
        "--per_device_train_batch_size", str(s["per_device_train_batch_size"]), "--learning_rate", f"{run.lr:g}",
        "--warmup_steps", str(s["warmup_steps"]), "--lr_scheduler_type", s["lr_scheduler_type"],
        "--weight_decay", str(s["weight_decay"]), "--adam_beta1", "0.9", "--adam_beta2", "0.95",
        "--eval_strategy", "steps", "--eval_steps", str(s["eval_steps"]), "--logging_steps", "10",
        "--save_strategy", "steps", "--save_steps", str(s["eval_steps"]), "--save_total_limit", "1",
        "--max_eval_samples", str(s["max_eval_samples"]), "--seed", str(run.seed),
        "--data_cache_dir", str(RUN_DIR / "data"), "--output_dir", str(output_dir),
        "--use_cpu", "--report_to", "none", "--disable_tqdm", "true",
    ]
    return cmd + (["--resume_from_checkpoint", str(resume)] if resume else [])


def load_cache() -> dict:
    return json.loads(CACHE.read_text()) if CACHE.exists() else {}


def store_result(key: str, result: dict) -> None:
    """Add one run to the cache under a file lock (several workers may finish runs at the same time)."""
    with open(CACHE.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cache = load_cache()
        cache[key] = result
        tmp = CACHE.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        tmp.replace(CACHE)


def _last_checkpoint(output_dir: Path) -> Path | None:
    ckpts = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return ckpts[-1] if ckpts else None


def run_one(run: Run, log) -> dict:
    """Train one run (resuming from its last checkpoint if any), return its eval curve and final loss."""
    output_dir = RUN_DIR / run.key.replace("/", "_")
    resume = _last_checkpoint(output_dir)
    cmd = command(run, output_dir, resume)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    print(" ".join(cmd), file=log, flush=True)
    subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    state = json.loads((_last_checkpoint(output_dir) / "trainer_state.json").read_text())
    history = state["log_history"]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    return {
        "model": run.model, "variant": run.variant.name, "lr": run.lr, "seed": run.seed,
        "final_eval_loss": evals[-1][1], "eval_curve": evals, "train_curve": train,
        "command": " ".join(command(run, output_dir)[1:]).replace(str(ROOT) + "/", ""),
        "resumed_from": resume.name if resume else None,  # an interrupted run continued from this checkpoint
    }


def family_grid(cache: dict, model: str, family: str) -> tuple[list[float], float | None]:
    """The family's lr grid and best lr (lowest final eval loss of its probe row on seed 0).

    Starts from ``LR_GRID``; while the best lr is at an edge of the grid, the grid grows by a factor of 2 past
    that edge (at most ``MAX_GRID_EXTENSIONS`` times), so the chosen lr is bracketed. Best is None until every
    lr of the current grid has a cached result.
    """
    lrs = list(LR_GRID[family])
    for _ in range(MAX_GRID_EXTENSIONS + 1):
        losses = {}
        for lr in lrs:
            r = cache.get(f"{model}/{GRID_PROBE[family]}/lr{lr:g}/s0")
            if r is None:
                return lrs, None
            losses[lr] = r["final_eval_loss"]
        best = min(losses, key=losses.get)
        if len(lrs) - len(LR_GRID[family]) >= MAX_GRID_EXTENSIONS or best not in (lrs[0], lrs[-1]):
            return lrs, best
        lrs = [best / 2, *lrs] if best == lrs[0] else [*lrs, best * 2]
    return lrs, best


def best_lr(cache: dict, model: str, family: str) -> float | None:
    return family_grid(cache, model, family)[1]


def phases(cache: dict, seeds: tuple[int, ...], full: bool = False) -> list[list[Run]]:
    """Runs in priority order; later phases need the lr grid's result (empty until it is cached).

    Default: the lr grids of both models, GPT-2 main rows on every seed (the target rows first), LLaMA rows and
    the ablations on seed 0 (~50 runs of ~1 minute each on an idle CPU core); ``full`` adds the other seeds for
    LLaMA and the ablations.
    """
    from .variants import VARIANTS

    grid = [
        Run(m, VARIANTS[GRID_PROBE[f]], lr, 0) for m in MODELS for f in LR_GRID for lr in family_grid(cache, m, f)[0]
    ]
    lrs = {(m, f): best_lr(cache, m, f) for m in MODELS for f in LR_GRID}
    if None in lrs.values():
        return [grid]

    def row(model: str, name: str, seed: int) -> Run:
        v = VARIANTS[name]
        return Run(model, v, lrs[model, v.family], seed)

    main = [row("gpt2", v.name, s) for v in QUALITY_MAIN for s in seeds[:1]]
    # the rows the quality targets compare, on the other seeds, before everything else
    core = [row("gpt2", n, s) for s in seeds[1:] for n in CORE_ROWS]
    llama = [row("llama", n, 0) for n in LLAMA_ROWS]
    ablations = [row("gpt2", v.name, 0) for v in ABLATION_ROWS]
    rest = [row("gpt2", v.name, s) for s in seeds[1:] for v in QUALITY_MAIN if v.name not in CORE_ROWS]
    plan = [grid, main, core, llama, ablations, rest]
    if full:
        plan += [
            [row("llama", n, s) for s in seeds[1:] for n in LLAMA_ROWS],
            [row("gpt2", v.name, s) for s in seeds[1:] for v in ABLATION_ROWS],
        ]
    return plan


def run_study(
    seeds: tuple[int, ...] = (0, 1, 2),
    log_path: Path | None = None,
    max_runs: int | None = None,
    full: bool = False,
    worker: tuple[int, int] = (0, 1),
) -> dict:
    """Run every missing run (resumable), caching each result in ``quality_runs.json`` as soon as it ends.

    ``worker=(i, n)``: this process takes every n-th run of the plan starting at i, so n workers started with
    i = 0..n-1 share the study without overlap.
    """
    from tqdm import tqdm

    RESULTS.mkdir(parents=True, exist_ok=True)
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    index, n_workers = worker
    log_path = log_path or RUN_DIR / f"quality{'' if n_workers == 1 else index}.log"

    def mine(run: Run, cache: dict) -> bool:
        """Runs are dealt round-robin in plan order (the plan is fixed once the lr grid is done)."""
        order = [r.key for p in phases(cache, seeds, full) for r in p]
        return run.key not in cache and order.index(run.key) % n_workers == index

    done = 0
    with open(log_path, "a") as log:
        while True:
            cache = load_cache()
            pending = [p for p in phases(cache, seeds, full) if any(mine(r, cache) for r in p)]
            if not pending or (max_runs is not None and done >= max_runs):
                return cache
            # Only the lr grid can change the plan: run the first pending phase, then re-plan.
            for run in tqdm([r for r in pending[0] if mine(r, cache)], desc="quality runs", file=sys.stdout):
                tqdm.write(f"run {run.key}")
                result = run_one(run, log)
                store_result(run.key, result)
                tqdm.write(f"  final eval loss {result['final_eval_loss']:.4f}")
                done += 1
                if max_runs is not None and done >= max_runs:
                    return load_cache()


def summarize(cache: dict) -> dict:
    """Per (model, variant) at the model's best lr for the variant's family: mean, std, min, max over seeds.

    ``lr`` and ``grid`` are keyed by model, then family (each model has its own lr sweep).
    """
    from .variants import VARIANTS

    out: dict = {"lr": {}, "grid": {}, "rows": {}}
    for model in MODELS:
        out["lr"][model], out["grid"][model] = {}, {}
        for family in LR_GRID:
            lrs, best = family_grid(cache, model, family)
            out["lr"][model][family] = best
            out["grid"][model][family] = {
                f"{lr:g}": cache[k]["final_eval_loss"]
                for lr in lrs
                if (k := f"{model}/{GRID_PROBE[family]}/lr{lr:g}/s0") in cache
            }
        for name, v in VARIANTS.items():
            lr = out["lr"][model][v.family]
            runs = [r for r in cache.values() if r["model"] == model and r["variant"] == name and r["lr"] == lr]
            if not runs:
                continue
            losses = [r["final_eval_loss"] for r in sorted(runs, key=lambda r: r["seed"])]
            out["rows"][f"{model}/{name}"] = {
                "model": model, "variant": name, "label": v.label, "lr": lr, "seeds": [r["seed"] for r in runs],
                "mean": statistics.fmean(losses), "std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
                "min": min(losses), "max": max(losses), "losses": losses,
            }
    return out
