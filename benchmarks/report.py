"""RESULTS.md and the PNG charts, generated from ``benchmarks/results/*.json`` (no measurement here)."""

from __future__ import annotations

import json
from pathlib import Path

from .quality import LR_GRID, MODELS, SCHEDULE, load_cache
from .speed import RATIO_REFERENCES
from .variants import ABLATION_ROWS, MAIN_ROWS, VARIANTS

COMMANDS = """```bash
make bench                                   # = .venv/bin/python -m benchmarks all: memory, speed, peak,
                                             #   quality summary of the cached runs, report (15-20 min, 2 cores)
.venv/bin/python -m benchmarks memory        # results/memory.json (seconds)
.venv/bin/python -m benchmarks launches      # results/launches.json: kernels per step, GPU proxy (8 min on AVX2)
.venv/bin/python -m benchmarks speed --shape gpt2-24x64 --rounds 5   # results/speed_gpt2-24x64.json: launch-bound
.venv/bin/python -m benchmarks speed         # results/speed.json (CPU, 1 thread, 2 warm-up + 9 timed steps per row)
git clone https://github.com/YupengSu/MuonQ ../MuonQ-paper   # the paper's code, for its speed row (not vendored)
MUONQ_REFERENCE_SRC=../MuonQ-paper .venv/bin/python -m benchmarks speed   # the same, with the paper's MuonQ row
.venv/bin/python -m benchmarks lowprec       # results/low_precision.json: pure-bf16 runs by weight_update, step cost
.venv/bin/python -m benchmarks peak          # results/peak.json (GPT-2 small training steps, a process per row)
PYTHONPATH=. python3 -m benchmarks gpu --out DIR  # GPU machine: CUDA checks, speed, peak (<= 7 min)
nohup .venv/bin/python -m benchmarks quality --run > runs/bench_quality/driver.log 2>&1 &   # the training study
#   (resumable: finished runs are cached in results/quality_runs.json, a stopped run resumes from its last
#    checkpoint; `--worker 0/2` and `--worker 1/2` split it over two processes; `--full` adds seeds 1-2 for
#    LLaMA and the ablations)
.venv/bin/python -m benchmarks quality       # results/quality.json: summary of the cached runs (no training)
.venv/bin/python -m benchmarks report        # RESULTS.md + PNGs from the JSON files
```"""


def _load(out: Path, name: str) -> dict | None:
    path = out / "results" / name
    return json.loads(path.read_text()) if path.exists() else None


def _mib(b: float) -> str:
    return f"{b / 2**20:,.1f}"


def memory_section(mem: dict) -> list[str]:
    lines = ["## Memory: optimizer state", ""]
    lines += [
        "Counted analytically from parameter shapes (models built from configs on the `meta` device, no weights), "
        "with each optimizer's exact state layout: codes, scales, low-rank factors, step counters, bnb's shared "
        "qmaps. The count equals the bytes of the real state tensors after one step on a small GPT-2 for every "
        f"row and ablation ({'all equal' if all(v['equal'] for v in mem['verification'].values()) else 'MISMATCH'};"
        " `tests/test_benchmarks.py` checks it on GPT-2 and LLaMA). MuonQ rows use `muonq_hf.param_groups` "
        "(fused QKV split in three). \"Muon part\" = the state of the Muon-routed matrices only.", "",
    ]
    for shape, t in mem["shapes"].items():
        lines += [
            f"### {shape}: {t['params'] / 1e6:.1f}M parameters, {t['muon_params'] / 1e6:.1f}M in Muon matrices", "",
            "| optimizer | total MiB | bytes/param | Muon part MiB | AdamW part MiB | Muon part: fp32 Muon / this "
            "| total: fp32 Muon / this | total / bnb AdamW8bit |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        bnb = t["rows"]["bnb_adamw8bit"]["total"]
        for row in t["rows"].values():
            ratio = row.get("muon_ratio_vs_muon_fp32")
            lines.append(
                f"| {row['label']} | {_mib(row['total'])} | {row['bytes_per_param']:.2f} | {_mib(row['muon'])} | "
                f"{_mib(row['adamw'])} | {f'{ratio:.2f}x' if ratio else '-'} | "
                f"{row['total_ratio_vs_muon_fp32']:.2f}x | {row['total'] / bnb:.2f} |"
            )
        lines.append("")
    lines += ["![optimizer state memory](memory.png)", ""]
    return lines


def speed_section(speed: dict) -> list[str]:
    m = speed["machine"]
    lines = [
        "## Speed: optimizer step time", "",
        f"Model `{speed['shape']}` ({speed['params'] / 1e6:.1f}M parameters: GPT-2-small layer shapes, 2 layers, "
        f"vocab 8192), fixed random gradients, all rows built in one process and stepped round-robin (order rotated "
        f"each round) so that load from other processes hits every row alike; {speed['warmup']} warm-up steps, "
        f"median of {speed['rounds']} timed steps. Timer: {speed.get('timer', 'wall time')} (ratios use it; the CPU "
        f"is shared with other jobs, so wall time, shown too, swings from step to step). CPU: {m['cpu']}, "
        f"{m['cores']} cores, torch {m['torch']} with {m['torch_threads']} thread(s).", "",
    ]
    refs = [r for r in RATIO_REFERENCES if all(f"ratio_vs_{r}" in row for row in speed["rows"].values())]
    names = {"torch_muon": "torch.optim.Muon + AdamW", "muon_fp32": "Muon fp32", "adamw": "torch AdamW"}
    lines += [
        "| optimizer | median ms | min ms | max ms | wall median ms | " + " | ".join(f"/ {names[r]}" for r in refs)
        + " |", "|---|---:|---:|---:|---:|" + "---:|" * len(refs),
    ]
    for row in speed["rows"].values():
        wall = row.get("wall_median_s")
        lines.append(
            f"| {row['label']} | {row['median_s'] * 1e3:,.1f} | {row['min_s'] * 1e3:,.1f} | "
            f"{row['max_s'] * 1e3:,.1f} | {f'{wall * 1e3:,.1f}' if wall else '-'} | "
            + " | ".join(f"{row[f'ratio_vs_{r}']:.2f}" for r in refs) + " |"
        )
    if speed.get("rows_not_installed"):
        lines += ["", f"Rows left out (not installed on the machine of this run): "
                      f"{', '.join(speed['rows_not_installed'])}."]
    if "paper_muonq" in speed["rows"]:
        lines += ["", "The paper's MuonQ is the authors' code (github.com/YupengSu/MuonQ, `src/optim/muonq.py`, "
                      "options of its `muonq.yaml`) from a checkout named by `MUONQ_REFERENCE_SRC`; it is not vendored "
                      "here (`benchmarks/peers.py`)."]
    gpu = speed.get("gpu")
    lines += ["", "GPU: " + ("see `speed.json`" if gpu else "this run was on the CPU; the GPU figures (`python -m "
              "benchmarks gpu`, `results/gpu_h200.json`) are in the discussion below."), ""]
    lines += ["Where a MuonQ matrix step spends its time (median CPU ms per stage, one matrix, 1 thread):", ""]
    sizes = list(speed["stage_profile"])
    lines += ["| stage | " + " | ".join(sizes) + " |", "|---|" + "---:|" * len(sizes)]
    for stage in speed["stage_profile"][sizes[0]]:
        if stage.startswith("work above NS"):  # a ratio, not a time
            cells = " | ".join(f"{speed['stage_profile'][s][stage]:.1%}" for s in sizes)
        else:
            cells = " | ".join(f"{speed['stage_profile'][s][stage] * 1e3:.1f}" for s in sizes)
        lines.append(f"| {stage} | {cells} |")
    lines.append("")
    return lines


def launches_section(launches: dict) -> list[str]:
    lines = [
        "## Kernel launches per optimizer step", "",
        "What a GPU step of small matrices pays for: one launch (plus its host work) per kernel. Counted on the "
        "CPU's dispatcher for one step after two (`benchmarks/launches.py`): ops that run a kernel, views, "
        "allocations and host reads excluded, each call of a fused function (one `torch.compile` graph) counted "
        "once; compiling off and bf16 products native, as a GPU runs them. The count does not depend on the "
        "device.", "",
    ]
    shapes = list(launches["shapes"])
    first = launches["shapes"][shapes[0]]
    lines += ["| optimizer | " + " | ".join(f"`{s}`" for s in shapes) + " |", "|---|" + "---:|" * len(shapes)]
    for name, row in first["rows"].items():
        cells = " | ".join(f"{launches['shapes'][s]['rows'][name]['launches']:,}" for s in shapes)
        lines.append(f"| {row['label']} | {cells} |")
    sizes = ", ".join(f"`{s}` {launches['shapes'][s]['matrices']} matrices in {launches['shapes'][s]['tensors']} "
                      f"tensors" for s in shapes)
    lines += ["", f"Models: {sizes} (GPT-2, vocab 1024; `benchmarks/models.py`)."]
    if launches.get("rows_not_installed"):
        lines += [f"Rows left out (not installed): {', '.join(launches['rows_not_installed'])}."]
    lines.append("")
    return lines


def extra_speed_section(name: str, speed: dict) -> list[str]:
    """A speed run on another model (``python -m benchmarks speed --shape S``): its table of step times."""
    m = speed["machine"]
    lines = [f"### Step time on `{speed['shape']}` ({speed['params'] / 1e6:.1f}M parameters)", "",
             f"`python -m benchmarks speed --shape {speed['shape']}` (`results/{name}`): all rows in one process, "
             f"round-robin, median of {speed['rounds']} steps after {speed['warmup']}; {speed.get('timer')}; "
             f"CPU: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} thread(s).", ""]
    refs = [r for r in RATIO_REFERENCES if all(f"ratio_vs_{r}" in row for row in speed["rows"].values())]
    lines += ["| optimizer | median ms | " + " | ".join(f"/ {r}" for r in refs) + " |",
              "|---|---:|" + "---:|" * len(refs)]
    for row in speed["rows"].values():
        lines.append(f"| {row['label']} | {row['median_s'] * 1e3:,.1f} | "
                     + " | ".join(f"{row[f'ratio_vs_{r}']:.2f}" for r in refs) + " |")
    lines.append("")
    return lines


def low_precision_section(lp: dict) -> list[str]:
    """bf16 weights without an fp32 master copy (``python -m benchmarks lowprec``): training runs and step cost."""
    runs = lp["quality"] if isinstance(lp["quality"], list) else [lp["quality"]]
    q, cost, m = runs[0], lp["cost"], lp["machine"]
    lrs = " and ".join(f"{run['lr']:g}" for run in runs)
    lines = ["## Low-precision weights", "",
             f"`python -m benchmarks lowprec` (`results/low_precision.json`), CPU: {m['cpu']}. `examples/run_clm.py` "
             f"trains a GPT-2 ({q['layers']} layers, width {q['width']}, vocab {q['vocab']}) for {q['steps']} steps "
             f"with MuonQ at lr {lrs} (the quality study's schedule: warm-up, cosine decay to 0); the reference keeps "
             "fp32 weights and computes in bf16 (`--bf16`), the others keep the weights in bf16 with no fp32 copy "
             "(`--torch_dtype bfloat16`) and `--optim_args weight_update=...`. Eval loss of one seed:", "",
             "| weights | " + " | ".join(f"lr {run['lr']:g} | vs fp32 master" for run in runs) + " |",
             "|---|" + "---:|---:|" * len(runs)]
    for name in q["rows"]:
        cells = [f"{run['rows'][name]['eval_loss']:.4f} | {100 * run['rows'][name]['vs_fp32_master']:+.2f}%"
                 for run in runs]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"Optimizer step on bf16 weights, `{cost['shape']}` shapes (CPU time, one thread, median of "
              f"{cost['rounds']} steps, all rows interleaved in one process):", "",
              "| optimizer | median ms | / MuonQ nearest |", "|---|---:|---:|"]
    for name, row in cost["rows"].items():
        label = "MuonQ, bf16 weights rounded to nearest (default)" if name == "muonq" else row["label"]
        lines.append(f"| {label} | {row['median_s'] * 1e3:,.1f} | {row['vs_muonq_nearest']:.2f} |")
    lines += ["", "No GPU figure for these modes yet: `python -m benchmarks gpu` times them (its bf16 rows) when a "
              "GPU runs it.", ""]
    return lines


def quality_section(q: dict) -> list[str]:
    s = SCHEDULE
    lines = [
        "## Quality: tiny GPT-2 and LLaMA pretraining through the HF Trainer", "",
        f"`examples/run_clm.py` on the embedded corpus (`examples/corpus.py`, BPE vocab 4096), {s['n_layer']} layers, "
        f"d={s['n_embd']}, {s['n_head']} heads, block {s['block_size']}, batch {s['per_device_train_batch_size']}, "
        f"{s['max_steps']} steps, {s['warmup_steps']} warm-up steps then cosine, weight decay {s['weight_decay']}, "
        f"AdamW betas (0.9, 0.95) everywhere, eval loss on {s['max_eval_samples']} held-out blocks. One process per "
        "run, 1 CPU thread. The lr is tuned per model and per family on seed 0: Muon family on fp32 Muon over "
        f"{LR_GRID['muon']}, AdamW family on torch AdamW over {LR_GRID['adamw']}, each grid extended by a factor 2 "
        "past an edge while the best lr sits on it; every row of a family then uses its model's best lr. The exact "
        "command of every run is in `results/quality_runs.json`. The runs are cached from before Newton-Schulz "
        "became bf16 by default (they ran it in fp32 on the CPU) and before the split's bf16 products; rerunning "
        "the study (`--run` after clearing the cache) measures the current defaults.", "",
        "lr grid (final eval loss, seed 0):", "",
    ]
    for model, grids in q["grid"].items():
        for fam, grid in grids.items():
            if grid:
                points = ", ".join(f"{lr} -> {loss:.4f}" for lr, loss in grid.items())
                lines.append(f"- {model}, {fam}: {points} (best {q['lr'][model][fam]})")
    lines.append("")
    for model in MODELS:
        rows = {k.split("/")[1]: r for k, r in q["rows"].items() if k.startswith(model + "/")}
        if not rows:
            continue
        ref = rows.get("muon_fp32")
        lines += [
            f"### {model}", "",
            "| optimizer | lr | seeds | final eval loss mean | std | min | max | vs fp32 Muon |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for v in MAIN_ROWS + ABLATION_ROWS:
            r = rows.get(v.name)
            if r is None:
                continue
            rel = f"{(r['mean'] / ref['mean'] - 1) * 100:+.2f}%" if ref else "-"
            lines.append(
                f"| {r['label']} | {r['lr']:g} | {len(r['seeds'])} | {r['mean']:.4f} | {r['std']:.4f} | "
                f"{r['min']:.4f} | {r['max']:.4f} | {rel} |"
            )
        lines.append("")
    lines += ["![eval loss curves](loss_curves.png)", "", "![final eval loss per row](final_losses.png)", ""]
    return lines


def _within(rel_percent: float) -> str:
    if abs(rel_percent) <= 1:
        return "yes"
    return "no: better by more than 1%" if rel_percent < 0 else "no: worse"


def peak_section(peak: dict) -> list[str]:
    m = peak["machine"]
    cuda = any(r.get("meter") == "max_memory_allocated" for r in peak["rows"].values())
    lines = [
        "## Peak memory of real training steps", "",
        f"`{peak['shape']}`, fp32, batch {peak['batch'][0]} x {peak['batch'][1]}, {peak['steps']} steps (forward, "
        "backward, `optimizer.step()`, `zero_grad(set_to_none=True)`), each optimizer in a fresh process, "
        f"{peak.get('repeats', 1)} times (the median peak; all peaks in `results/peak.json`) "
        f"(`python -m benchmarks peak`). Meter: {'max_memory_allocated' if cuda else 'peak RSS (VmHWM)'} on "
        f"{m['cpu']}. *Step extra*: how far the last step rose above the memory held just before it (its "
        "temporaries; the state exists by then). RSS counts what the allocator keeps, so rows differ by tens of "
        "MiB from run to run.", "",
        "| optimizer | peak MiB | above no optimizer | step extra MiB | state MiB |", "|---|---:|---:|---:|---:|",
    ]
    floor = peak["rows"].get("none", {}).get("peak")
    for row, r in peak["rows"].items():
        label = VARIANTS[row].label if row in VARIANTS else "no optimizer (forward + backward only)"
        if "error" in r:
            lines.append(f"| {label} | {r['error']} | | | |")
            continue
        above = f"{(r['peak'] - floor) / 2**20:+.0f}" if floor else "-"
        lines.append(f"| {label} | {r['peak'] / 2**20:.0f} | {above} | {r['step_extra'] / 2**20:.0f} | "
                     f"{r['state'] / 2**20:.0f} |")
    return [*lines, ""]


def launch_targets(launches: dict | None, extra_speed: dict[str, dict]) -> list[str]:
    """The GPU-step targets: launches per step on the 12 x 256 GPT-2, and the launch-bound CPU step time."""
    lines = []
    shape = (launches or {}).get("shapes", {}).get("gpt2-12x256")
    if shape and {"torch_muon", "muonq"} <= set(shape["rows"]):
        rows = shape["rows"]
        mine, peer = rows["muonq"]["launches"], rows["torch_muon"]["launches"]
        cuda = rows.get("muonq_cuda_groups", {}).get("launches")
        lines.append(f"| Kernel launches per step <= torch.optim.Muon + AdamW's (gpt2-12x256) | {mine:,} (CUDA's "
                     f"groups: {cuda:,}) vs {peer:,} | {'yes' if mine <= peer else 'no'} |")
    small = extra_speed.get("gpt2-24x64")
    if small and "torch_muon" in small["rows"]:
        r = small["rows"]["muonq"]["ratio_vs_torch_muon"]
        lines.append(f"| MuonQ step <= 1.0x torch.optim.Muon + AdamW (gpt2-24x64, CPU, 1 thread) | {r:.2f}x | "
                     f"{'yes' if r <= 1.0 else 'no'} |")
    return lines


def speed_peak_targets(speed: dict | None, peak: dict | None) -> list[str]:
    lines = []
    if speed and "torch_muon" in speed["rows"]:
        r = speed["rows"]["muonq"]["ratio_vs_torch_muon"]
        lines.append(f"| MuonQ step <= 1.05x torch.optim.Muon + AdamW ({speed['shape']}, CPU, 1 thread) | {r:.2f}x | "
                     f"{'yes' if r <= 1.05 else 'no'} |")
        if "paper_muonq" in speed["rows"]:
            paper = speed["rows"]["paper_muonq"]["median_s"] / speed["rows"]["muonq"]["median_s"]
            lines.append(f"| MuonQ step faster than the paper authors' MuonQ code (same harness) | their step "
                         f"{paper:.2f}x MuonQ's | {'yes' if paper > 1 else 'no'} |")
        profile = speed.get("stage_profile", {}).get("768x3072", {})
        share = profile.get("work above NS / bf16 NS")
        if share is not None:
            lines.append(f"| MuonQ work above its Newton-Schulz <= 15% (768x3072) | {share:.1%} | "
                         f"{'yes' if share <= 0.15 else 'no'} |")
    if peak:
        rows = {k: v for k, v in peak["rows"].items() if "peak" in v}
        if {"muonq_adam8", "bnb_adamw8bit", "muonq"} <= set(rows):
            a8 = rows["muonq_adam8"]["peak"]
            lines.append(f"| Peak memory ({peak['shape']}): MuonQ adamw_bits=8 below bnb AdamW8bit and below MuonQ "
                         f"with fp32 AdamW | {a8 / 2**20:.0f} vs {rows['bnb_adamw8bit']['peak'] / 2**20:.0f} and "
                         f"{rows['muonq']['peak'] / 2**20:.0f} MiB | "
                         f"{'yes' if a8 < rows['bnb_adamw8bit']['peak'] and a8 < rows['muonq']['peak'] else 'no'} |")
    return lines


def targets_section(mem: dict | None, q: dict | None, speed: dict | None = None, peak: dict | None = None,
                    launches: dict | None = None, extra_speed: dict[str, dict] | None = None) -> list[str]:
    lines = ["## Targets of the issues", "", "| target | measured | met |", "|---|---|---|"]
    lines += launch_targets(launches, extra_speed or {})
    lines += speed_peak_targets(speed, peak)
    if mem:
        small = mem["shapes"].get("gpt2-small")
        if small:
            r = small["rows"]["muonq_adam8"]["total"] / small["rows"]["bnb_adamw8bit"]["total"]
            lines.append(f"| MuonQ (4-bit, 8-bit AdamW) state <= 1/3 of bnb AdamW8bit, GPT-2 small | {r:.3f} | "
                         f"{'yes' if r <= 1 / 3 else 'no'} |")
        below = {s: t["rows"]["muonq_adam8"]["total"] / t["rows"]["bnb_adamw8bit"]["total"]
                 for s, t in mem["shapes"].items()}
        lines.append("| ... below bnb AdamW8bit on every model | " + ", ".join(f"{s} {v:.2f}" for s, v in below.items())
                     + f" | {'yes' if all(v < 1 for v in below.values()) else 'no'} |")
        ratios = {s: t["rows"]["muonq"]["muon_ratio_vs_muon_fp32"] for s, t in mem["shapes"].items()}
        lines.append("| MuonQ Muon-part ratio >= 7x vs fp32 Muon | " + ", ".join(f"{s} {v:.2f}x" for s, v in
                     ratios.items()) + f" | {'yes' if all(v >= 7 for v in ratios.values()) else 'no'} |")
    if q:
        for model in MODELS:
            rows = {k.split("/")[1]: r for k, r in q["rows"].items() if k.startswith(model + "/")}
            if not {"muon_fp32", "muonq"} <= set(rows):
                continue
            ref, mq = rows["muon_fp32"], rows["muonq"]
            rel = (mq["mean"] / ref["mean"] - 1) * 100
            n = f"n={len(mq['seeds'])}/{len(ref['seeds'])}"
            lines.append(f"| {model}: MuonQ eval loss within 1% of fp32 Muon | {mq['mean']:.4f} vs {ref['mean']:.4f}"
                         f" ({rel:+.2f}%, {n}) | {_within(rel)} |")
            if "muonq_fp32" in rows:  # the 4-bit storage alone, against the same algorithm in fp32
                full = rows["muonq_fp32"]
                rel_q = (mq["mean"] / full["mean"] - 1) * 100
                lines.append(f"| {model}: MuonQ 4-bit within 1% of MuonQ fp32 (quantization only) | {mq['mean']:.4f}"
                             f" vs {full['mean']:.4f} ({rel_q:+.2f}%, n={len(mq['seeds'])}/{len(full['seeds'])}) | "
                             f"{_within(rel_q)} |")
            for base in ("adamw", "bnb_adamw8bit"):
                if base in rows:
                    b = rows[base]
                    lines.append(f"| {model}: MuonQ better than {b['label']} | {mq['mean']:.4f} vs {b['mean']:.4f} | "
                                 f"{'yes' if mq['mean'] < b['mean'] else 'no'} |")
            if "naive4" in rows:
                nv = rows["naive4"]
                gap = nv["mean"] - ref["mean"]
                spread = max(ref["std"], nv["std"])
                lines.append(f"| {model}: naive 4-bit measurably worse than fp32 Muon | {nv['mean']:.4f} vs "
                             f"{ref['mean']:.4f} (gap {gap:+.4f}, largest seed std {spread:.4f}) | "
                             f"{'yes' if gap > 2 * spread > 0 or (spread == 0 and gap > 0) else 'no'}"
                             f"{' (one seed)' if spread == 0 else ''} |")
    lines.append("")
    return lines


def plot_memory(mem: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(mem["shapes"])
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4.5), squeeze=False)
    for ax, shape in zip(axes[0], shapes, strict=True):
        rows = mem["shapes"][shape]["rows"]
        labels = [r["label"] for r in rows.values()]
        muon = [r["muon"] / 2**20 for r in rows.values()]
        adamw = [r["adamw"] / 2**20 for r in rows.values()]
        y = range(len(labels))
        ax.barh(y, adamw, color="tab:gray", label="AdamW part")
        ax.barh(y, muon, left=adamw, color="tab:blue", label="Muon part")
        ax.set_yticks(list(y), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("optimizer state (MiB)")
        ax.set_title(f"{shape} ({mem['shapes'][shape]['params'] / 1e6:.0f}M params)")
    axes[0][0].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(cache: dict, q: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in MODELS if any(k.startswith(m + "/") for k in q["rows"])]
    fig, axes = plt.subplots(1, max(len(models), 1), figsize=(6.5 * max(len(models), 1), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models, strict=False):
        for v in MAIN_ROWS:
            row = q["rows"].get(f"{model}/{v.name}")
            if row is None:
                continue
            runs = [r for r in cache.values() if (r["model"], r["variant"], r["lr"]) == (model, v.name, row["lr"])]
            steps = [s for s, _ in runs[0]["eval_curve"]]
            mean = [sum(r["eval_curve"][i][1] for r in runs) / len(runs) for i in range(len(steps))]
            ax.plot(steps, mean, marker="o", ms=3, label=f"{v.label} (lr {row['lr']:g}, n={len(runs)})")
        ax.set_xlabel("step")
        ax.set_ylabel("eval loss (mean over seeds)")
        ax.set_title(f"tiny {model}")
        ax.set_ylim(top=min(ax.get_ylim()[1], 7.5))
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_final_losses(q: dict, path: Path) -> None:
    """Final eval loss of every GPT-2 row (main rows and ablations), mean with min-max bars over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [q["rows"][f"gpt2/{v.name}"] for v in MAIN_ROWS + ABLATION_ROWS if f"gpt2/{v.name}" in q["rows"]]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.2))
    y = list(range(len(rows)))
    means = [r["mean"] for r in rows]
    err = [[r["mean"] - r["min"] for r in rows], [r["max"] - r["mean"] for r in rows]]
    colors = ["tab:gray" if VARIANTS[r["variant"]].family == "adamw" else "tab:blue" for r in rows]
    ax.barh(y, means, xerr=err, color=colors, capsize=3)
    ax.set_yticks(y, [f"{r['label']} (n={len(r['seeds'])})" for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(min(r["min"] for r in rows) - 0.1, max(r["max"] for r in rows) + 0.05)
    ax.set_xlabel("final eval loss, tiny GPT-2 (bars: min-max over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path) -> Path:
    mem, speed, q = _load(out, "memory.json"), _load(out, "speed.json"), _load(out, "quality.json")
    peak = _load(out, "peak.json")
    lines = ["# Benchmarks: MuonQ vs torch.optim.Muon, Keller Jordan's Muon, torchao, bitsandbytes, AdamW", "",
             "Generated by `python -m benchmarks report` from `benchmarks/results/*.json`. Commands:", "", COMMANDS, ""]
    if speed or mem:
        m = (speed or mem)["machine"]
        hw = f"GPU {m['gpu']}" if m["gpu"] else "no GPU"
        bf16 = {True: ", with bf16 dot products", False: ", without bf16 dot products (AVX2)"}.get(
            m.get("cpu_bf16_dot_products"), "")
        lines += [f"Machine: {m['cpu']}{bf16}, {m['cores']} CPU cores (shared with other jobs), {hw}; torch "
                  f"{m['torch']}, Python {m['python']}.", ""]
    launches = _load(out, "launches.json")
    extra_speed = {path.name.removeprefix("speed_").removesuffix(".json"): json.loads(path.read_text())
                   for path in sorted((out / "results").glob("speed_*.json"))}
    lines += targets_section(mem, q, speed, peak, launches, extra_speed)
    if mem:
        lines += memory_section(mem)
        plot_memory(mem, out / "memory.png")
    if launches:
        lines += launches_section(launches)
    if speed:
        lines += speed_section(speed)
    for name, extra in extra_speed.items():
        lines += extra_speed_section(f"speed_{name}.json", extra)
    if peak:
        lines += peak_section(peak)
    low_precision = _load(out, "low_precision.json")
    if low_precision:
        lines += low_precision_section(low_precision)
    if q and q["rows"]:
        lines += quality_section(q)
        plot_curves(load_cache(), q, out / "loss_curves.png")
        plot_final_losses(q, out / "final_losses.png")
    for notes in ("DISCUSSION.md", "DISTRIBUTED.md"):  # hand-written: the discussion, the multi-process figures
        notes_path = Path(__file__).resolve().parent / notes
        if notes_path.exists():
            lines += [notes_path.read_text()]
    path = out / "RESULTS.md"
    path.write_text("\n".join(lines))
    print(f"wrote {path}")
    return path


__all__ = ["write_report", "VARIANTS"]
