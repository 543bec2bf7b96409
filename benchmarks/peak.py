"""Peak memory of real training steps, one fresh process per optimizer.

Each row runs in its own interpreter (``python -m benchmarks.peak --child ROW ...``), so that one row's freed
memory (which the allocator may keep) cannot hide or inflate another's. The child builds the model from its
config (fp32), trains ``steps`` steps on a fixed batch (forward, backward, ``optimizer.step()``,
``zero_grad(set_to_none=True)``) and reports:

* ``peak``: the process's peak memory over the whole run: CPU: peak RSS (``VmHWM``); CUDA:
  ``torch.cuda.max_memory_allocated``. The row ``none`` (forward and backward only) is the floor.
* ``step_extra``: how far the last ``optimizer.step()`` rose above the memory held just before it (CPU: the peak
  RSS counter is reset through ``/proc/self/clear_refs`` before the step; CUDA: ``reset_peak_memory_stats``):
  the step's transient memory, its temporaries (a whole embedding decoded to fp32, say), since the state
  already exists at the last step.
* ``state``: the optimizer's state bytes (``muonq_hf.state_bytes``, each storage once).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROWS = ("none", "adamw", "bnb_adamw8bit_hf", "bnb_adamw8bit", "torchao_adamw8bit", "torchao_adamw4bit",
        "torch_muon", "keller_muon", "muonq", "muonq_adam8")
MIB = 2**20


def _status_bytes(field: str) -> int:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


class Meter:
    """Current and peak memory of this process on ``device``, with a resettable peak."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def now(self) -> int:
        return torch.cuda.memory_allocated() if self.cuda else _status_bytes("VmRSS")

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated() if self.cuda else _status_bytes("VmHWM")

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current RSS


def child(row: str, shape: str, steps: int, device: str, batch: int, seq: int, dtype: str = "float32") -> dict:
    from muonq_hf import state_bytes

    from .models import build_model
    from .variants import get_variant, make_optimizer

    dev = torch.device(device)
    meter = Meter(dev)
    model = build_model(shape, device=dev, dtype=getattr(torch, dtype))
    optimizer = None if row == "none" else make_optimizer(get_variant(row), model, lr=1e-4)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0)).to(dev)
    losses, run_peak, before, step_peak = [], 0, 0, 0
    for step in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
        if step == steps - 1:  # the last step: its transient memory, the state being allocated already
            run_peak = meter.peak()
            meter.reset_peak()
            before = meter.now()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)
        if step == steps - 1:
            step_peak = meter.peak()
    state = state_bytes(optimizer)["total"] if optimizer is not None else 0
    return {
        "row": row, "peak": max(run_peak, step_peak), "step_extra": step_peak - before, "state": state,
        "losses": losses, "device": device, "dtype": dtype,
        "meter": "max_memory_allocated" if meter.cuda else "peak RSS (VmHWM)",
    }


def _child_process(row: str, shape: str, steps: int, device: str, batch: int, seq: int, threads: int, dtype: str,
                   timeout: float | None) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.peak", "--child", row, "--shape", shape, "--steps", str(steps),
           "--device", device, "--batch", str(batch), "--seq", str(seq), "--threads", str(threads), "--dtype", dtype]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
                              env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"}, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"row": row, "error": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0:
        raise RuntimeError(f"benchmarks.peak row {row!r} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_rows(
    rows: list[str], shape: str, steps: int, device: str, batch: int, seq: int, threads: int,
    dtype: str = "float32", timeout: float | None = None, repeats: int = 1,
) -> dict:
    """Each row in its own process, ``repeats`` times: {row: the report of the run with the median peak, and
    every run's peak}. CPU peak RSS varies by ~10% from process to process (what the allocator keeps,
    torch.compile's own memory at the first step); the median of 3 steadies it. A row past ``timeout`` seconds
    is reported as such."""
    out = {}
    for row in rows:
        reports = [_child_process(row, shape, steps, device, batch, seq, threads, dtype, timeout)
                   for _ in range(repeats)]
        if any("error" in r for r in reports):
            out[row] = next(r for r in reports if "error" in r)
            continue
        reports.sort(key=lambda r: r["peak"])
        r = out[row] = {**reports[len(reports) // 2], "peaks": [x["peak"] for x in reports]}
        print(f"  {row:20s} peak {r['peak'] / MIB:8.0f} MiB  step extra {r['step_extra'] / MIB:7.0f} MiB  "
              f"state {r['state'] / MIB:7.0f} MiB  (peaks {[round(x / MIB) for x in r['peaks']]})", flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peak", description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=ROWS, help="run one row in this process (used by run_rows)")
    parser.add_argument("--shape", default="gpt2-small")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--repeats", type=int, default=3, help="processes per row; the median peak is reported")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args.child, args.shape, args.steps, args.device, args.batch, args.seq, args.dtype)))
    else:
        print(json.dumps(run_rows(list(ROWS), args.shape, args.steps, args.device, args.batch, args.seq,
                                  args.threads, args.dtype, repeats=args.repeats), indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
