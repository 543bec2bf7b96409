"""The GPU check: one command, bounded in time, that checks MuonQ on CUDA and measures it against its peers.

    PYTHONPATH=. python3 -m benchmarks gpu --out DIR [--budget 420]   # on a machine with a GPU, repo root
    python -m benchmarks gpu --out DIR --device cpu --quick    # the same code paths on CPU (tested in CI)

1. Checks (seconds): the 4-bit codec, bf16 Newton-Schulz, MuonQ against MuonQ on the CPU (fp32 state: the
   same updates to 2e-3; defaults: the same loss to 1%), a bit-exact resume through ``state_dict``, the 8-bit
   AdamW codec, host syncs in a step (CUDA's sync debug mode: one, the non-finite decision). Each check reports
   what it compared and by how much it differed.
2. Kernel launches per step (``benchmarks.launches``, the dispatcher's count on the device) on GPT-2 small and
   the launch-bound 12 x 256 GPT-2.
3. Step time (``benchmarks.speed.step_times``, wall time after a CUDA sync) in bf16 on GPT-2 small, on a
   Qwen3-MoE shape with 64 experts per layer stored as 3-D tensors and on a ~1B LLaMA shape, MuonQ against
   torch.optim.Muon, Keller Jordan's Muon, torchao and bitsandbytes.
4. Peak memory (``benchmarks.peak``, ``torch.cuda.max_memory_allocated``, one process per row) of 3 bf16
   training steps of GPT-2 small.

Everything is written to DIR after each part (``gpu.json``, ``gpu.md``), so a run stopped by its time limit
still returns what it measured; parts that would start after ``--budget`` seconds are skipped and say so.
"""

from __future__ import annotations

import copy
import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from muonq_hf import MuonQ, param_groups
from muonq_hf.codecs import dequantize, dequantize_dynamic8, dynamic_codebook, quantize, quantize_dynamic8
from muonq_hf.orthogonalize import zeropower_via_newtonschulz5

from .launches import LAUNCH_ROWS, launches_per_step
from .models import build_model
from .peak import run_rows
from .peers import installed
from .speed import step_times
from .variants import VARIANTS

GPU_SPEED_ROWS = ("torch_muon", "keller_muon", "muonq", "muonq_graph", "muonq_unbatched", "muonq_adam8", "adamw",
                  "bnb_adamw8bit_hf", "torchao_adamw8bit", "muonq_bf16_kahan", "muonq_bf16_stochastic",
                  "torchao_adamw8bit_bf16sr")
CUDA_ONLY_ROWS = ("muonq_graph",)  # left out of the quick CPU run
BF16_ONLY_ROWS = ("muonq_bf16_kahan", "muonq_bf16_stochastic", "torchao_adamw8bit_bf16sr")  # bf16 weights' options
GPU_PEAK_ROWS = ("none", "adamw", "bnb_adamw8bit_hf", "torchao_adamw8bit", "torch_muon", "muonq", "muonq_unbatched",
                 "muonq_adam8", "muonq_graph")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm().clamp(min=1e-30))


# --------------------------------------------------------------------------------------------- checks
def check_codec(dev: torch.device) -> dict:
    """4-bit mu-law codes of one matrix on ``dev`` against the CPU's: the same codes but for rounding ties."""
    x = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    x = x / x.norm()
    codes_cpu, scale_cpu = quantize(x, 4, 255.0)
    codes_dev, scale_dev = quantize(x.to(dev), 4, 255.0)
    same = float((codes_dev.cpu() == codes_cpu).float().mean())
    err = _rel(dequantize(codes_dev, scale_dev, 512, 4, 255.0), dequantize(codes_cpu, scale_cpu, 512, 4, 255.0))
    return {"ok": same > 0.999 and err < 1e-2, "codes_equal_fraction": same, "decoded_rel_diff": err}


def check_newton_schulz(dev: torch.device) -> dict:
    """bf16 NS on ``dev`` against fp32 NS on the CPU: the same direction (cosine > 0.99)."""
    G = torch.randn(384, 768, generator=torch.Generator().manual_seed(1))
    X = zeropower_via_newtonschulz5(G.to(dev)).float().cpu()
    ref = zeropower_via_newtonschulz5(G, dtype=torch.float32)
    cos = float((X * ref).sum() / (X.norm() * ref.norm()))
    return {"ok": cos > 0.99, "cosine_to_cpu_fp32": cos}


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        ids = _batch(step, model.config.vocab_size, next(model.parameters()).device)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _batch(step: int, vocab: int, device: torch.device) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(step)).to(device)


def check_optimizer(dev: torch.device) -> dict:
    """MuonQ on ``dev`` against MuonQ on the CPU, 5 steps of a tiny GPT-2 (dropout off).

    * fp32 state and NS (``bits=32, ns_dtype="fp32"``): the same computation up to float reduction order, so
      every Muon matrix's update and all parameters' together agree to 2e-3.
    * the defaults (4-bit state, bf16 NS): a 4-bit code flipped at a rounding tie changes the next step's split
      and codes, so updates drift apart even between two CPU runs with another thread count (5-15% per
      matrix after 5 steps, measured); the check is that both train alike: the drop of the loss on the first
      batch (8.37 -> 6.52 on the CPU) agrees to 2% (two CPU thread counts: 0.07%). Not per AdamW parameter:
      the key bias of attention has a gradient of float noise (~1e-9; softmax ignores it), which Adam scales to
      +-lr with a device-dependent sign.
    """
    out: dict = {}
    for name, options in (("fp32_state", dict(bits=32, ns_dtype="fp32")), ("defaults", {})):
        updates, drops = [], []
        for device in (torch.device("cpu"), dev):
            model = build_model("gpt2-tiny", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0).to(device)
            opt = MuonQ(param_groups(model), lr=0.01, **options)
            muon = {id(p) for g in opt.param_groups if g["use_muon"] for p in g["params"]}
            start = {n: p.detach().clone().cpu() for n, p in model.named_parameters()}
            ids = _batch(0, model.config.vocab_size, device)
            with torch.no_grad():
                before = float(model(input_ids=ids, labels=ids).loss)
            _train(model, opt, range(5))
            updates.append({n: (p.detach().cpu() - start[n], id(p) in muon) for n, p in model.named_parameters()})
            with torch.no_grad():
                drops.append(before - float(model(input_ids=ids, labels=ids).loss))
        cpu, other = updates
        per_matrix = {n: _rel(other[n][0], cpu[n][0]) for n in cpu if cpu[n][1]}
        worst = max(per_matrix, key=per_matrix.get)
        total = _rel(torch.cat([other[n][0].flatten() for n in cpu]), torch.cat([cpu[n][0].flatten() for n in cpu]))
        drop_diff = abs(drops[1] - drops[0]) / abs(drops[0])
        out[f"{name}_muon_max_rel_diff"], out[f"{name}_worst_muon_matrix"] = per_matrix[worst], worst
        out[f"{name}_all_params_rel_diff"] = total
        out[f"{name}_loss_drop_cpu"], out[f"{name}_loss_drop_device"] = drops
        if name == "fp32_state":
            out[f"ok_{name}"] = per_matrix[worst] < 2e-3 and total < 2e-3
        else:
            out[f"ok_{name}"] = drops[0] > 0.5 and drop_diff < 2e-2  # it trains, and alike
    out["ok"] = out["ok_fp32_state"] and out["ok_defaults"]
    return out


def check_resume(dev: torch.device) -> dict:
    """Train 3 steps, save ``state_dict``, load it into a fresh optimizer, train 2 more: bit-identical to 5 steps."""
    model = build_model("gpt2-tiny", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0).to(dev)
    twin = copy.deepcopy(model)
    opt = MuonQ(param_groups(model), lr=0.01, adamw_bits=8)
    _train(model, opt, range(3))
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _train(model, opt, range(3, 5))
    twin.load_state_dict(saved_model)
    opt2 = MuonQ(param_groups(twin), lr=0.01, adamw_bits=8)
    opt2.load_state_dict(saved_opt)
    _train(twin, opt2, range(3, 5))
    pairs = zip(model.parameters(), twin.parameters(), strict=True)
    worst = max(float((p.detach() - q.detach()).abs().max()) for p, q in pairs)
    return {"ok": worst == 0.0, "max_abs_weight_diff": worst}


def check_adamw8(dev: torch.device) -> dict:
    """The blockwise 8-bit AdamW codec on ``dev``: the CPU's codes (the same nearest-entry search)."""
    x = torch.randn(64, 1000, generator=torch.Generator().manual_seed(2))
    book_cpu, book_dev = dynamic_codebook(True), dynamic_codebook(True, dev)
    codes_cpu, absmax_cpu = quantize_dynamic8(x, book_cpu)
    codes_dev, absmax_dev = quantize_dynamic8(x.to(dev), book_dev)
    same = float((codes_dev.cpu() == codes_cpu).float().mean())
    decoded = dequantize_dynamic8(codes_dev, absmax_dev, book_dev)
    err = _rel(decoded, dequantize_dynamic8(codes_cpu, absmax_cpu, book_cpu))
    return {"ok": same > 0.999 and err < 1e-3, "codes_equal_fraction": same, "decoded_rel_diff": err}


def check_host_syncs(dev: torch.device) -> dict:
    """Host syncs in a MuonQ step after the first (GPT-2 tiny: defaults, ``adamw_bits=8``, a replayed
    ``cuda_graph=True`` step), counted by CUDA's
    sync debug mode (a warning per synchronizing call): one is the non-finite decision; no other is allowed.
    On CPU there is nothing to count (tests/test_device_step.py checks the same on tensors without data)."""
    if dev.type != "cuda":
        return {"ok": True, "skipped": "no CUDA device"}
    out: dict = {}
    for name, options in (("defaults", {}), ("adamw_bits_8", {"adamw_bits": 8}), ("cuda_graph", {"cuda_graph": True})):
        model = build_model("gpt2-tiny").to(dev)
        opt = MuonQ(param_groups(model), lr=0.01, **options)
        _train(model, opt, range(3))  # with cuda_graph the third step is recorded: the fourth is a replay
        ids = _batch(3, model.config.vocab_size, dev)
        model(input_ids=ids, labels=ids).loss.backward()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
        out[f"{name}_syncs"] = len(syncs)
        out[f"{name}_first"] = syncs[:3]
    out["ok"] = all(out[f"{n}_syncs"] <= 1 for n in ("defaults", "adamw_bits_8", "cuda_graph"))
    return out


def check_cuda_graph(dev: torch.device) -> dict:
    """``cuda_graph=True`` against the eager step: GPT-2 tiny, 6 steps with a new lr and new gradient tensors at each
    (step 3 is recorded, 4-6 replayed). With fp32 state and NS every weight agrees to 1e-5 (the recorded form
    scales by a device lr: rounding); with the defaults and ``adamw_bits=8`` the loss after them agrees to 1%."""
    if dev.type != "cuda":
        return {"ok": True, "skipped": "no CUDA device"}
    out: dict = {}
    for name, options in (("fp32_state", dict(bits=32, ns_dtype="fp32")), ("defaults_adamw8", dict(adamw_bits=8))):
        models, losses = [], []
        for graph in (False, True):
            model = build_model("gpt2-tiny", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0).to(dev)
            opt = MuonQ(param_groups(model), lr=0.01, cuda_graph=graph, **options)
            for step in range(6):
                for group in opt.param_groups:
                    group["lr"] = 0.01 * (1 - step / 10)
                ids = _batch(step, model.config.vocab_size, dev)
                model(input_ids=ids, labels=ids).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                losses.append(float(model(input_ids=ids, labels=ids).loss))
            models.append(model)
            if graph:
                out[f"{name}_recordings"] = opt._graph.recordings
        pairs = zip(models[1].parameters(), models[0].parameters(), strict=True)
        out[f"{name}_max_rel_diff"] = max(_rel(p.detach(), q.detach()) for p, q in pairs)
        out[f"{name}_loss_eager"], out[f"{name}_loss_graph"] = losses
    out["ok"] = (out["fp32_state_max_rel_diff"] < 1e-5 and out["fp32_state_recordings"] == 1
                 and abs(out["defaults_adamw8_loss_graph"] / out["defaults_adamw8_loss_eager"] - 1) < 1e-2)
    return out


CHECKS: dict[str, Callable[[torch.device], dict]] = {
    "codec_4bit": check_codec, "newton_schulz_bf16": check_newton_schulz, "optimizer_vs_cpu": check_optimizer,
    "resume_bit_exact": check_resume, "adamw_8bit_codec": check_adamw8, "host_syncs": check_host_syncs,
    "cuda_graph_vs_eager": check_cuda_graph,
}


# ---------------------------------------------------------------------------------------------- run
def _label(row: str) -> str:
    return VARIANTS[row].label if row in VARIANTS else "no optimizer (forward + backward)"


def _speed_rows(speed: dict) -> list[str]:
    rows = ["| optimizer | median ms | / torch.optim.Muon + AdamW |", "|---|---:|---:|"]
    for row in speed["rows"].values():
        ratio = row.get("ratio_vs_torch_muon")
        rows.append(f"| {row['label']} | {row['median_s'] * 1e3:.2f} | {f'{ratio:.2f}' if ratio else '-'} |")
    return rows


def _launch_rows(launches: dict) -> list[str]:
    rows = ["| optimizer | launches per step |", "|---|---:|"]
    rows += [f"| {row['label']} | {row['launches']:,} |" for row in launches["rows"].values()]
    return rows


def _peak_rows(peak: dict) -> list[str]:
    rows = ["| optimizer | peak MiB | step extra MiB | state MiB |", "|---|---:|---:|---:|"]
    for row, r in peak["rows"].items():
        figures = [r["error"], "", ""] if "error" in r else [
            f"{r[k] / 2**20:.0f}" for k in ("peak", "step_extra", "state")]
        rows.append(f"| {_label(row)} | " + " | ".join(figures) + " |")
    return rows


# what a reader of a table must know about its rows
SHAPE_NOTES = {
    "qwen3-moe-64": "torch.optim.Muon takes 2-D parameters only: its row steps the 3-D expert tensors with its AdamW. "
                    "Keller Jordan's Muon and MuonQ orthogonalize each expert's matrices.",
    "qwen3-moe-tiny": "torch.optim.Muon takes 2-D parameters only: its row steps the 3-D expert tensors with its "
                      "AdamW.",
}


def markdown(report: dict) -> str:
    lines = [f"# GPU check: {report['device_name']}", "", f"Command: `{report['command']}`", ""]
    if report.get("rows_not_installed"):
        lines += [f"Rows left out (package not installed here): {', '.join(report['rows_not_installed'])}", ""]
    lines += ["## Checks", "", "| check | ok | figures |", "|---|---|---|"]
    for name, r in report["checks"].items():
        figures = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items() if k != "ok")
        lines.append(f"| {name} | {'yes' if r.get('ok') else 'NO'} | {figures} |")
    parts = [(f"Kernel launches per step, {shape}", part, _launch_rows) for shape, part in report["launches"].items()]
    parts += [(f"Step time, {shape}", part, _speed_rows) for shape, part in report["speed"].items()]
    parts += [(f"Peak memory, {shape} (3 training steps, batch 1 x 128)", part, _peak_rows)
              for shape, part in report["peak"].items()]
    for title, part, table in parts:
        if "skipped" in part:
            lines += ["", f"## {title}: skipped ({part['skipped']})"]
        else:
            note = SHAPE_NOTES.get(part.get("shape", ""))
            lines += ["", f"## {title}", "", *([note, ""] if note else []), *table(part)]
    return "\n".join(lines) + "\n"


def run(out: Path, device: str, quick: bool, budget: float, command: str) -> dict:
    """Run the checks, then as much of the speed and peak tables as fits in ``budget`` seconds."""
    start = time.time()
    dev = torch.device(device)
    out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(0) if dev.type == "cuda" else "CPU (plumbing run)"
    report: dict = {"device": device, "device_name": name, "command": command, "torch": torch.__version__,
                    "checks": {}, "launches": {}, "speed": {}, "peak": {}}

    def save() -> None:
        report["elapsed_s"] = time.time() - start
        (out / "gpu.json").write_text(json.dumps(report, indent=1))
        (out / "gpu.md").write_text(markdown(report))

    for check, fn in CHECKS.items():
        try:
            report["checks"][check] = fn(dev)
        except Exception as exc:  # a failed check is a finding to report, not a reason to lose the others
            report["checks"][check] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        save()
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    missing = sorted({r for r in GPU_SPEED_ROWS + GPU_PEAK_ROWS if r in VARIANTS and not installed(VARIANTS[r].kind)})
    report["rows_not_installed"] = missing  # a peer whose package this machine lacks: said, not silently dropped
    launch_rows = [v for v in LAUNCH_ROWS if v.name not in missing and installed(v.kind)]
    for shape in ["gpt2-tiny"] if quick else ["gpt2-small", "gpt2-12x256"]:  # the dispatcher's count on the device
        report["launches"][shape] = launches_per_step(shape, launch_rows, device=device)
        save()
    speed_shapes = ["gpt2-tiny", "qwen3-moe-tiny"] if quick else ["gpt2-small", "qwen3-moe-64", "llama-1b"]
    for shape in speed_shapes:
        if time.time() - start > budget * 0.6:
            report["speed"][shape] = {"skipped": f"past 60% of the {budget:.0f} s budget"}
            continue
        # torchao compiles its step per parameter shape: on the large shapes that alone would take minutes
        rows = [VARIANTS[r] for r in GPU_SPEED_ROWS if r not in missing
                and not ((quick or shape != "gpt2-small") and r.startswith("torchao"))
                and not (dev.type != "cuda" and r in CUDA_ONLY_ROWS)
                and not (dtype == torch.float32 and r in BF16_ONLY_ROWS)]
        report["speed"][shape] = step_times(shape, rows, warmup=1 if quick else 2, rounds=2 if quick else 5,
                                            device=device, dtype=dtype)
        save()
    peak_shape = "gpt2-tiny" if quick else "gpt2-small"
    rows = [r for r in GPU_PEAK_ROWS if r not in missing and not (quick and r.startswith("torchao"))
            and not (dev.type != "cuda" and r in CUDA_ONLY_ROWS)]
    rows = rows[: 3 if quick else None]
    left = budget - (time.time() - start)
    if left < 30:
        report["peak"][peak_shape] = {"skipped": f"{left:.0f} s of the {budget:.0f} s budget left"}
    else:
        report["peak"][peak_shape] = {"rows": run_rows(rows, peak_shape, steps=3, device=device, batch=1, seq=128,
                                                       threads=2, dtype=str(dtype).removeprefix("torch."),
                                                       timeout=left / len(rows))}
    save()
    return report
