"""The routing report: every trainable parameter -> Muon or AdamW, its matrix plan, weight decay and state bytes.

    python -m muonq_hf.plan --model_type qwen3_moe            # a transformers config name (default sizes)
    python -m muonq_hf.plan path/to/model_dir                 # a local model directory (its config.json)
    python -m muonq_hf.plan config.json --optim_args "bits=4,adamw_bits=8,adamw_names=score.*"

The model is built from its config on the meta device (no weights, no memory, no network). The Trainer logs
``routing_summary`` (one line) when it builds MuonQ.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from torch import nn

from .grouping import Route, route
from .matrices import plan_of, shaped
from .memory import expected_state_bytes
from .options import DEFAULTS, parse_optim_args

MiB = 2**20


def _group_of(r: Route, options: dict) -> dict:
    return {**DEFAULTS, **options, "use_muon": r.muon, **r.plan}


def describe_plan(r: Route, options: dict | None = None) -> str:
    """``8 x [2 x (64, 128)]``: experts x pieces and their shapes; ``-`` for AdamW."""
    if not r.muon:
        return "-"
    plan = plan_of(r.param, _group_of(r, options or {}))
    pieces = " + ".join(f"{len(js)} x {plan.batch_shape(b)}" if len(js) > 1 else str(plan.batch_shape(b))
                        for b, js in enumerate(plan.batches))
    text = pieces if plan.k > 1 else str((plan.m, plan.n))
    if plan.interleaved:
        text += " interleaved"
    return f"{plan.experts} x [{text}]" if plan.stacked else text


def state_bytes_of(routes: list[Route], options: dict | None = None) -> dict[str, int]:
    """Expected optimizer-state bytes, {"muon": ..., "adamw": ..., "total": ...}."""
    out = {"muon": 0, "adamw": 0}
    for r in routes:
        shape = tuple(shaped(r.param).shape)
        out["muon" if r.muon else "adamw"] += expected_state_bytes(shape, _group_of(r, options or {}), r.param.dtype)
    return {**out, "total": out["muon"] + out["adamw"]}


def routing_summary(routes: list[Route], options: dict | None = None) -> str:
    """One line for the training log: tensors and parameters per optimizer, planned matrices, state MiB."""
    muon = [r for r in routes if r.muon]
    adamw = [r for r in routes if not r.muon]
    planned = sum(1 for r in muon if r.plan)
    size = state_bytes_of(routes, options)
    numel = lambda rs: sum(shaped(r.param).numel() for r in rs) / 1e6  # noqa: E731
    unknown = [r.name for r in routes if "kept whole" in r.note]
    return (
        f"MuonQ routing: Muon {len(muon)} tensors ({numel(muon):.2f}M params, {planned} split into experts/pieces), "
        f"AdamW {len(adamw)} tensors ({numel(adamw):.2f}M params); optimizer state {size['total'] / MiB:.1f} MiB "
        f"(Muon {size['muon'] / MiB:.1f}, AdamW {size['adamw'] / MiB:.1f})"
        + (f"; fused layouts kept whole: {unknown[:3]}" if unknown else "")
        + ". Full table: python -m muonq_hf.plan"
    )


def report(routes: list[Route], options: dict | None = None) -> str:
    """The routing table of every trainable parameter, with totals."""
    rows = [("parameter", "group", "matrices", "wd", "state bytes", "why")]
    for r in routes:
        group = _group_of(r, options or {})
        wd = "yes" if r.decay else "no"
        why = r.reason + (f"; {r.note}" if r.note else "")
        nbytes = expected_state_bytes(tuple(shaped(r.param).shape), group, r.param.dtype)
        rows.append((r.name, "Muon" if r.muon else "AdamW", describe_plan(r, options), wd, f"{nbytes:,}", why))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append(routing_summary(routes, options).replace(". Full table: python -m muonq_hf.plan", ""))
    return "\n".join(lines)


def build_on_meta(source: str, is_model_type: bool) -> nn.Module:
    """A transformers model built from a config name, a local model directory or a JSON config, on meta."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    if is_model_type:
        config = AutoConfig.for_model(source)
    elif os.path.isdir(source):
        config = AutoConfig.from_pretrained(source, local_files_only=True)
    elif os.path.isfile(source):
        import json

        with open(source) as f:
            data = json.load(f)
        if "model_type" not in data:
            raise SystemExit(f"muonq_hf.plan: {source!r} has no 'model_type'; is it a transformers config.json?")
        config = AutoConfig.for_model(data.pop("model_type"), **data)
    else:
        raise SystemExit(f"muonq_hf.plan: no such directory or file: {source!r} (use --model_type for a config name)")
    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(config)
        except ValueError:  # not a causal LM (ViT, BERT-style encoders, ...): the base model
            return AutoModel.from_config(config)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m muonq_hf.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", nargs="?", help="a local model directory or a config.json")
    parser.add_argument("--model_type", help="a transformers config name (e.g. qwen3_moe), built with default sizes")
    parser.add_argument("--optim_args", default="", help="MuonQ options as for the Trainer's --optim_args")
    args = parser.parse_args(argv)
    if bool(args.source) == bool(args.model_type):
        parser.error("give either a model directory / config.json or --model_type")
    options: dict[str, Any] = parse_optim_args(args.optim_args)
    split_qkv = options.pop("split_qkv", True)
    names = {k: options.pop(k, "") for k in ("adamw_names", "muon_names")}
    options.pop("nonfinite", None)
    if options.get("seed") is None:
        options.pop("seed", None)
    model = build_on_meta(args.model_type or args.source, bool(args.model_type))
    print(report(route(model, split_qkv, **names), options))


if __name__ == "__main__":
    main(sys.argv[1:])
