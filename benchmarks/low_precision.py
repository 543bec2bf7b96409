"""Low-precision weights (``weight_update``, muonq_hf/weights.py): pure-bf16 training against the fp32-master run,
and what each mode adds to the optimizer step.

* ``quality``: ``examples/run_clm.py`` with the quality study's schedule (``benchmarks/quality.py``), MuonQ at
  the Muon family's lr and at a tenth of it, four ways each: fp32 weights with ``--bf16`` (bf16 compute, fp32
  master weights: the reference), and ``--torch_dtype bfloat16`` (bf16 weights, no fp32 copy) with
  ``weight_update`` nearest, stochastic and kahan. The vocabulary is 1024 (the study's 4096 made the bf16 logits
  3 s per step on a CPU without bf16 dot products); everything else is the study's.
* ``cost``: optimizer step time on bf16 GPT-2-small layer shapes (2 layers), all rows interleaved in one process
  (``benchmarks.speed.step_times``): MuonQ with each mode and torchao's 8-bit AdamW with its
  ``bf16_stochastic_round``, what a pure-bf16 user runs instead.

    python -m benchmarks lowprec [--quick]     -> results/low_precision.json
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from .quality import ROOT, SCHEDULE, optim_flags
from .speed import step_times
from .variants import VARIANTS

# the Muon family's lr of the quality study (results/quality.json), and a tenth of it, a fine-tuning lr: the smaller
# the steps, the more of them round away from bf16 weights
LRS = (0.02, 0.002)
VOCAB = 1024
MODES = {  # row -> (extra run_clm flags, MuonQ options)
    "fp32_master": (["--bf16", "true"], {}),
    "bf16_nearest": (["--torch_dtype", "bfloat16"], {}),
    "bf16_stochastic": (["--torch_dtype", "bfloat16"], {"weight_update": "stochastic"}),
    "bf16_kahan": (["--torch_dtype", "bfloat16"], {"weight_update": "kahan"}),
}
# torch.optim.Muon is left out on the CPU: its bf16 Newton-Schulz runs torch's bf16 kernel, which on a CPU without bf16
# dot products takes minutes per step here; the GPU check (benchmarks/gpu.py) times it beside these rows
COST_ROWS = ("muonq", "muonq_bf16_stochastic", "muonq_bf16_kahan", "torchao_adamw8bit_bf16sr")


def command(row: str, output_dir: Path, steps: int, layers: int, width: int, lr: float) -> list[str]:
    """The ``run_clm.py`` command of one quality row."""
    flags, options = MODES[row]
    optim = optim_flags(VARIANTS["muonq"])
    if options:
        optim = [*optim, "--optim_args", ",".join(f"{k}={v}" for k, v in options.items())]
    s = SCHEDULE
    return [
        sys.executable, str(ROOT / "examples" / "run_clm.py"), *optim, *flags,
        "--model_type", "gpt2", "--n_layer", str(layers), "--n_embd", str(width), "--n_head", str(s["n_head"]),
        "--block_size", str(s["block_size"]), "--vocab_size", str(VOCAB), "--max_steps", str(steps),
        "--per_device_train_batch_size", str(s["per_device_train_batch_size"]), "--learning_rate", f"{lr:g}",
        "--warmup_steps", str(min(s["warmup_steps"], steps // 4)), "--lr_scheduler_type", s["lr_scheduler_type"],
        "--weight_decay", str(s["weight_decay"]), "--adam_beta1", "0.9", "--adam_beta2", "0.95",
        "--max_eval_samples", str(s["max_eval_samples"]), "--seed", "0", "--save_strategy", "no",
        "--data_cache_dir", str(ROOT / "runs" / "bench_lowprec" / "data"), "--output_dir", str(output_dir),
        "--use_cpu", "--report_to", "none", "--disable_tqdm", "true",
    ]


def quality(quick: bool = False, lr: float = LRS[0]) -> dict:
    """Final eval loss of each row at ``lr`` and its ratio to the fp32-master run."""
    steps, layers, width = (8, 1, 32) if quick else (SCHEDULE["max_steps"], SCHEDULE["n_layer"], SCHEDULE["n_embd"])
    rows = {}
    for row in MODES:
        cmd = command(row, ROOT / "runs" / "bench_lowprec" / row, steps, layers, width, lr)
        start = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if out.returncode != 0:
            raise RuntimeError(f"{row}: run_clm failed ({out.returncode}):\n{out.stderr[-3000:]}")
        loss = float(re.search(r"final eval_loss ([0-9.]+)", out.stdout).group(1))
        rows[row] = {"eval_loss": loss, "wall_s": time.perf_counter() - start,
                     "command": " ".join(Path(c).name if c == sys.executable else c for c in cmd[1:])}
    for row in rows.values():
        row["vs_fp32_master"] = row["eval_loss"] / rows["fp32_master"]["eval_loss"] - 1
    return {"steps": steps, "layers": layers, "width": width, "lr": lr, "vocab": VOCAB, "rows": rows}


def cost(quick: bool = False) -> dict:
    """Step times of the cost rows on bf16 weights (CPU time, one thread as ``python -m benchmarks speed``)."""
    torch.set_num_threads(1)
    shape, rounds = ("gpt2-tiny", 3) if quick else ("gpt2-small-2l", 7)
    rows = [VARIANTS[name] for name in COST_ROWS]
    times = step_times(shape, rows, warmup=2, rounds=rounds, dtype=torch.bfloat16)
    base = times["rows"]["muonq"]["median_s"]
    for row in times["rows"].values():
        row["vs_muonq_nearest"] = row["median_s"] / base
    return {"shape": shape, "dtype": "bfloat16", "rounds": rounds, "rows": times["rows"]}
