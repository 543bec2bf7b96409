"""``python -m benchmarks memory|speed|quality|report|all [--quick] [--out DIR]``.

memory   analytic optimizer-state bytes on GPT-2 small/medium and LLaMA-1B shapes (meta device), checked
         against real state tensors on a small model            -> results/memory.json
speed    optimizer step time, all rows interleaved in one process -> results/speed.json (+ stage profile);
         with ``--shape S`` other than the default            -> results/speed_S.json
launches kernel-launching ops per optimizer step (CPU dispatcher, the GPU's launch count) on launch-bound
         GPT-2 shapes                                          -> results/launches.json
gpu      the GPU check (benchmarks/gpu.py): CUDA checks, then step time and peak memory against the peers,
         bounded by --budget seconds                             -> DIR/gpu.json, DIR/gpu.md
peak     peak memory of real training steps (GPT-2 small, fp32, batch 1 x 128), one process per optimizer
                                                                -> results/peak.json
lowprec  bf16 weights without an fp32 master copy: pure-bf16 training by weight_update against the fp32-master run
         (run_clm, 4 runs) and each mode's step cost                  -> results/low_precision.json
quality  summary of the cached quality study; ``--run`` trains the missing runs (long, resumable)
                                                                -> results/quality_runs.json, quality.json
report   RESULTS.md and PNG charts from the JSON files
all      memory + launches + speed + peak + quality summary (no training) + report
``--quick`` uses tiny models and few repeats (seconds; used by the tests), best with ``--out`` elsewhere.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from . import quality
from .memory import memory_table, verify_analytic
from .peers import installed
from .speed import RATIO_REFERENCES, stage_profile, step_times
from .variants import MAIN_ROWS, SPEED_ROWS, VARIANTS, get_variant

QUICK_SPEED_ROWS = MAIN_ROWS + [VARIANTS[n] for n in ("torch_muon", "keller_muon", "bnb_adamw8bit_hf")]

DEFAULT_OUT = Path(__file__).resolve().parent
SPEED_SHAPE = "gpt2-small-2l"  # GPT-2-small layer shapes: the compute-bound speed model


def _write(out: Path, name: str, data: dict) -> None:
    (out / "results").mkdir(parents=True, exist_ok=True)
    (out / "results" / name).write_text(json.dumps(data, indent=1))
    print(f"wrote {out / 'results' / name}")


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    from muonq_hf.precision import emulates_bf16

    return {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "cpu_bf16_dot_products": not emulates_bf16(torch.device("cpu")),  # else bf16 products run in fp32
        "python": platform.python_version(), "cuda": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def cmd_memory(args: argparse.Namespace) -> None:
    shapes = ["gpt2-tiny"] if args.quick else ["gpt2-small", "gpt2-medium", "llama-1b"]
    table = memory_table(shapes)
    # quick mode checks two rows only (the tests check every row); the full run checks every row and ablation
    rows = [get_variant("muonq_adam8"), get_variant("bnb_adamw8bit")] if args.quick else None
    check = verify_analytic("gpt2-tiny", rows)
    table_check = {k: {"analytic": a, "measured": m, "equal": a == m} for k, (a, m) in check.items()}
    for shape, t in table.items():
        print(f"\n{shape}: {t['params'] / 1e6:.1f}M params ({t['muon_params'] / 1e6:.1f}M in Muon matrices)")
        for row in t["rows"].values():
            ratio = row.get("muon_ratio_vs_muon_fp32")
            muon_part = f"  Muon part x{ratio:.2f} smaller than fp32 Muon" if ratio else ""
            mib, per_param = row["total"] / 2**20, row["bytes_per_param"]
            print(f"  {row['label']:30s} {mib:10.1f} MiB {per_param:6.2f} B/param{muon_part}")
    bad = [k for k, v in table_check.items() if not v["equal"]]
    print(f"\nanalytic vs measured on gpt2-tiny: {'all equal' if not bad else f'MISMATCH {bad}'}")
    _write(args.out, "memory.json", {"machine": machine(), "shapes": table, "verification": table_check})


def cmd_speed(args: argparse.Namespace) -> None:
    shape, rounds, warmup = ("gpt2-tiny", 2, 1) if args.quick else (args.shape, args.rounds, 2)
    rows = QUICK_SPEED_ROWS if args.quick else SPEED_ROWS  # quick: no torchao rows (each compiles for seconds)
    missing = [v.name for v in rows if not installed(v.kind)]  # said in the output and the report, not dropped
    if missing:
        print(f"rows left out (not installed here; see benchmarks/peers.py): {', '.join(missing)}")
    t0 = time.time()
    result = step_times(shape, [v for v in rows if v.name not in missing], warmup=warmup, rounds=rounds)
    result["rows_not_installed"] = missing
    result["wall_s"] = time.time() - t0
    for row in result["rows"].values():
        ratios = "  ".join(f"x{row[f'ratio_vs_{r}']:.2f} vs {r}" for r in RATIO_REFERENCES if f"ratio_vs_{r}" in row)
        print(f"  {row['label']:30s} {row['median_s'] * 1e3:9.1f} ms  {ratios}")
    sizes = [(128, 128)] if args.quick else [(768, 768), (768, 3072)]
    result["stage_profile"] = {f"{m}x{n}": stage_profile(m, n, repeats=1 if args.quick else 5) for m, n in sizes}
    result["gpu"] = None
    if torch.cuda.is_available() and not args.quick:
        result["gpu"] = step_times(shape, warmup=warmup, rounds=rounds, device="cuda")
    name = "speed.json" if args.shape == SPEED_SHAPE or args.quick else f"speed_{args.shape}.json"
    _write(args.out, name, {"machine": machine(), **result})


def cmd_launches(args: argparse.Namespace) -> None:
    from .launches import LAUNCH_ROWS, launches_per_step

    shapes = ["gpt2-tiny"] if args.quick else ["gpt2-12x256", "gpt2-24x64"]
    rows = [v for v in LAUNCH_ROWS if installed(v.kind)]
    result = {}
    for shape in shapes:
        result[shape] = launches_per_step(shape, rows)
        for row in result[shape]["rows"].values():
            print(f"  {shape:12s} {row['label']:36s} {row['launches']:7,d} launches per step")
    _write(args.out, "launches.json", {"machine": machine(), "shapes": result,
                                       "rows_not_installed": [v.name for v in LAUNCH_ROWS if v not in rows]})


def cmd_peak(args: argparse.Namespace) -> None:
    from .peak import ROWS, run_rows

    shape, rows = ("gpt2-tiny", ["none", "muonq_adam8", "bnb_adamw8bit_hf"]) if args.quick else ("gpt2-small", ROWS)
    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    result = run_rows(list(rows), shape, steps=3, device=device, batch=1, seq=128, threads=max(args.threads, 2),
                      repeats=1 if args.quick else 3)
    _write(args.out, "peak.json", {"machine": machine(), "shape": shape, "steps": 3, "batch": [1, 128],
                                   "repeats": 1 if args.quick else 3, "rows": result})


def cmd_gpu(args: argparse.Namespace) -> None:
    from .gpu import run

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    command = "python -m benchmarks " + " ".join(sys.argv[1:]) if sys.argv[1:] else "python -m benchmarks gpu"
    report = run(args.out, device, args.quick, args.budget, command)
    failed = [name for name, r in report["checks"].items() if not r.get("ok")]
    print((args.out / "gpu.md").read_text())
    print(f"checks: {len(report['checks']) - len(failed)} passed, failed: {failed or 'none'}")


def cmd_quality(args: argparse.Namespace) -> None:
    if args.run:
        i, n = (int(x) for x in args.worker.split("/"))
        quality.run_study(seeds=tuple(range(args.seeds)), max_runs=args.max_runs, full=args.full, worker=(i, n))
    cache = quality.load_cache()
    summary = quality.summarize(cache)
    for key, row in summary["rows"].items():
        print(f"  {key:32s} lr {row['lr']:g}  eval loss {row['mean']:.4f} +- {row['std']:.4f} (n={len(row['seeds'])})")
    _write(args.out, "quality.json", {"schedule": quality.SCHEDULE, "lr_grid": quality.LR_GRID,
                                      "n_runs": len(cache), **summary})


def cmd_lowprec(args: argparse.Namespace) -> None:
    from . import low_precision

    cost = low_precision.cost(args.quick)
    for row in cost["rows"].values():
        print(f"  {row['label']:46s} {row['median_s'] * 1e3:8.1f} ms  x{row['vs_muonq_nearest']:.2f} vs nearest")
    runs = [low_precision.quality(args.quick, lr) for lr in low_precision.LRS[: 1 if args.quick else None]]
    for run in runs:
        for name, row in run["rows"].items():
            print(f"  lr {run['lr']:g} {name:16s} eval loss {row['eval_loss']:.4f}  "
                  f"{100 * row['vs_fp32_master']:+.2f}% vs fp32 master")
    _write(args.out, "low_precision.json", {"machine": machine(), "cost": cost, "quality": runs})


def cmd_report(args: argparse.Namespace) -> None:
    from .report import write_report

    write_report(args.out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    commands = ("memory", "launches", "speed", "peak", "gpu", "lowprec", "quality", "report", "all")
    parser.add_argument("command", choices=commands)
    parser.add_argument("--quick", action="store_true", help="tiny models, few repeats (seconds)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for results/, RESULTS.md, PNGs")
    parser.add_argument("--shape", default=SPEED_SHAPE, help="speed model (see benchmarks/models.py)")
    parser.add_argument("--rounds", type=int, default=9, help="timed steps per row (speed)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable on a shared CPU)")
    parser.add_argument("--device", default=None, help="gpu: cuda (default when available) or cpu (plumbing)")
    parser.add_argument("--budget", type=float, default=420.0, help="gpu: seconds for the whole check")
    parser.add_argument("--run", action="store_true", help="quality: train the missing runs (long, resumable)")
    parser.add_argument("--seeds", type=int, default=3, help="quality: seeds per row")
    parser.add_argument("--full", action="store_true", help="quality: all seeds for LLaMA and the ablations too")
    parser.add_argument("--worker", default="0/1", help="quality: i/n, this process's share of the runs")
    parser.add_argument("--max_runs", type=int, default=None, help="quality: stop after this many new runs")
    args = parser.parse_args(argv)
    if args.quick and args.command == "quality" and args.run:
        parser.error("--quick does not train; run `python -m benchmarks quality --run` for the study")
    torch.set_num_threads(args.threads)
    commands = {"memory": [cmd_memory], "launches": [cmd_launches], "speed": [cmd_speed], "peak": [cmd_peak],
                "gpu": [cmd_gpu], "lowprec": [cmd_lowprec], "quality": [cmd_quality], "report": [cmd_report],
                "all": [cmd_memory, cmd_launches, cmd_speed, cmd_peak, cmd_quality, cmd_report]}
    for fn in commands[args.command]:
        fn(args)


if __name__ == "__main__":
    main(sys.argv[1:])
