"""The benchmark harness: its analytic memory count equals real state tensors, its CLI runs, errors are clear."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.__main__ import main
from benchmarks.memory import analytic_bytes, memory_table, verify_analytic
from benchmarks.models import build_model, config_for
from benchmarks.quality import optim_flags
from benchmarks.reference_muon import MuonBF16
from benchmarks.variants import ABLATION_ROWS, MAIN_ROWS, PEER_ROWS, get_variant, make_optimizer
from muonq_hf import MuonQ, param_groups


@pytest.fixture
def one_thread():
    """Benchmarks run single-threaded (stable timings on a shared CPU); restore the caller's setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("shape", ["gpt2-tiny", "llama-tiny"])
def test_analytic_state_bytes_equal_real_state_tensors(shape, one_thread):
    """Every row and ablation: the shape-only count == bytes of the optimizer's tensors after one step.

    gpt2-tiny has fused QKV (split in 3), tensors above and below bnb's 4096-element 8-bit threshold and a
    tied embedding; llama-tiny has GQA projections of unequal shapes and RMSNorm weights.
    """
    result = verify_analytic(shape)
    assert set(result) == {v.name for v in MAIN_ROWS + ABLATION_ROWS}
    mismatched = {name: counts for name, counts in result.items() if counts[0] != counts[1]}
    assert not mismatched


def test_analytic_count_works_on_meta_and_matches_hand_count_for_one_matrix():
    """A model with one 256 x 256 Muon matrix: the count of docs/design.md ("Memory") by hand, against meta."""
    model = torch.nn.Sequential(torch.nn.Linear(256, 256, bias=False)).to("meta")
    # residual 0.5 B/elem, P and R (256 x 16) 0.5 B/elem, fp16 scales (1 residual + 2 x 16 columns), step
    expected = 256 * 128 + 2 * 256 * 8 + 2 * (1 + 2 * 16) + 4
    assert analytic_bytes(model, get_variant("muonq"))["muon"] == expected
    assert analytic_bytes(model, get_variant("muon_fp32"))["muon"] == 256 * 256 * 4 + 4


def test_gpt2_small_shapes_muon_part_at_least_7x_and_below_bnb():
    """The issue's memory targets on real GPT-2-small / LLaMA-1B shapes (meta device, no weights)."""
    table = memory_table(["gpt2-small", "llama-1b"])
    small = table["gpt2-small"]
    assert small["params"] == 124_439_808  # GPT-2 small, tied LM head
    assert small["rows"]["muonq"]["muon_ratio_vs_muon_fp32"] >= 7.0
    for t in table.values():
        assert t["rows"]["muonq_adam8"]["total"] < t["rows"]["bnb_adamw8bit"]["total"]


def test_bf16_reference_muon_tracks_fp32_muon_up_to_bf16_rounding(one_thread):
    """MuonBF16 is Muon with a bf16 buffer: equal to fp32 Muon after step 1 (M = G), close but not equal later."""
    torch.manual_seed(0)
    weights = torch.randn(64, 48)
    models, opts = [], []
    for cls, options in ((MuonBF16, {}), (MuonQ, dict(bits=32, normalize=False, rank_divisor=0, mu=0.0))):
        model = torch.nn.Sequential(torch.nn.Linear(48, 64, bias=False))
        model[0].weight.data.copy_(weights)
        models.append(model)
        opts.append(cls(param_groups(model, **options), lr=0.01))
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        grad = torch.randn(64, 48, generator=gen)
        for model, opt in zip(models, opts, strict=True):
            model[0].weight.grad = grad.clone()
            opt.step()
        if step == 0:
            assert torch.equal(models[0][0].weight, models[1][0].weight)
    buf = opts[0].state[models[0][0].weight]["momentum_buffer"]
    ref = opts[1].state[models[1][0].weight]["res"]
    assert buf.dtype == torch.bfloat16
    rel = ((buf.float() - ref).norm() / ref.norm()).item()
    assert 0 < rel < 2**-7  # bf16 keeps 8 significant bits: relative rounding <= 2^-9 per step, 3 steps


def test_cli_quick_mode_writes_results_and_report(tmp_path, one_thread):
    main(["all", "--quick", "--out", str(tmp_path), "--threads", "1"])
    memory = json.loads((tmp_path / "results" / "memory.json").read_text())
    assert all(v["equal"] for v in memory["verification"].values())
    speed = json.loads((tmp_path / "results" / "speed.json").read_text())
    assert set(speed["rows"]) == {"adamw", "bnb_adamw8bit", "muon_fp32", "muon_bf16", "naive4",
                                  "muon8_block2048", "muonq", "muonq_adam8", "torch_muon", "keller_muon",
                                  "bnb_adamw8bit_hf"}
    assert speed["rows"]["muon_fp32"]["ratio_vs_muon_fp32"] == 1.0
    assert speed["rows"]["torch_muon"]["ratio_vs_torch_muon"] == 1.0
    assert all(row["median_s"] > 0 for row in speed["rows"].values())
    report = (tmp_path / "RESULTS.md").read_text()
    assert "## Memory" in report and "## Speed" in report and (tmp_path / "memory.png").stat().st_size > 0


def test_unknown_names_are_rejected_with_the_allowed_values():
    with pytest.raises(ValueError, match="unknown benchmark variant 'muonx'.*muonq"):
        get_variant("muonx")
    with pytest.raises(ValueError, match="unknown model shape 'gpt5'.*gpt2-small"):
        config_for("gpt5")
    with pytest.raises(ValueError, match="'muon_bf16'.*no Trainer --optim name"):
        optim_flags(get_variant("muon_bf16"))
    with pytest.raises(SystemExit):
        main(["quality", "--quick", "--run"])


def test_trainer_flags_select_each_variant():
    assert optim_flags(get_variant("muonq")) == ["--optim", "muonq"]
    assert optim_flags(get_variant("bnb_adamw8bit")) == ["--optim", "adamw_bnb_8bit"]
    expected = "bits=8,normalize=false,rank_divisor=0,mu=0.0,block_size=2048"
    assert optim_flags(get_variant("muon8_block2048"))[-1] == expected
    model = build_model("gpt2-tiny", device="meta")
    assert isinstance(make_optimizer(get_variant("muonq_adam8"), model, lr=0.01), MuonQ)


def test_lr_grid_grows_past_an_edge_until_the_best_lr_is_bracketed():
    """The study's lr search: a best lr at the grid's edge adds lr/2 (or 2 lr); an inner best stops the search."""
    from benchmarks.quality import LR_GRID, family_grid, phases

    def cache_of(losses: dict[float, float]) -> dict:
        return {f"gpt2/muon_fp32/lr{lr:g}/s0": {"final_eval_loss": loss} for lr, loss in losses.items()}

    base = LR_GRID["muon"]
    assert family_grid({}, "gpt2", "muon") == (list(base), None)
    at_low_edge = cache_of({lr: lr for lr in base})  # loss grows with lr: the lowest lr wins
    lrs, best = family_grid(at_low_edge, "gpt2", "muon")
    assert lrs == [base[0] / 2, *base] and best is None  # the new lr is not trained yet
    bracketed = cache_of({**{lr: lr for lr in base}, base[0] / 2: 1.0})
    assert family_grid(bracketed, "gpt2", "muon") == ([base[0] / 2, *base], base[0])
    # until both families have a best lr, only the grid phase is planned
    assert [[r.key for r in p] for p in phases(bracketed, (0,))][0][0] == f"gpt2/muon_fp32/lr{base[0] / 2:g}/s0"
    assert len(phases(bracketed, (0,))) == 1


def test_each_model_rows_use_that_model_s_own_best_lr():
    """LLaMA has its own lr sweep: its rows run at LLaMA's best lr, GPT-2's at GPT-2's, per family."""
    from benchmarks.quality import GRID_PROBE, LR_GRID, family_grid, phases, summarize

    best = {("gpt2", "muon"): LR_GRID["muon"][1], ("gpt2", "adamw"): LR_GRID["adamw"][1],
            ("llama", "muon"): LR_GRID["muon"][0] / 2, ("llama", "adamw"): LR_GRID["adamw"][2] * 2}
    cache = {}
    for (model, family), lr_best in best.items():
        while (grid := family_grid(cache, model, family))[1] is None:  # train the grid, V-shaped around lr_best
            for lr in grid[0]:
                row = dict(model=model, variant=GRID_PROBE[family], lr=lr, seed=0, final_eval_loss=abs(lr - lr_best))
                cache[f"{model}/{GRID_PROBE[family]}/lr{lr:g}/s0"] = row
    plan = phases(cache, (0, 1), full=True)
    llama_rows = [r for p in plan[1:] for r in p if r.model == "llama"]
    assert {r.variant.name for r in llama_rows} >= {"muonq_adam8", "bnb_adamw8bit"}
    assert all(r.lr == best["llama", r.variant.family] for r in llama_rows)
    assert all(r.lr == best["gpt2", r.variant.family] for p in plan[1:] for r in p if r.model == "gpt2")
    assert summarize(cache)["lr"] == {m: {f: best[m, f] for f in LR_GRID} for m in ("gpt2", "llama")}


@pytest.mark.parametrize("name", [v.name for v in PEER_ROWS])
def test_peer_rows_build_the_optimizer_users_run_and_step(name, one_thread):
    """Each peer trains the tiny model (its loss drops over a few steps) and keeps the state it should: Muon
    momentum on MuonQ's Muon matrices only, bnb as HF runs it with 32-bit state for the embeddings."""
    from benchmarks.models import build_model
    from benchmarks.peers import REFERENCE_ENV, installed
    from benchmarks.variants import get_variant, make_optimizer

    model = build_model("gpt2-tiny")
    if not installed(get_variant(name).kind):  # the paper's code is a checkout named by MUONQ_REFERENCE_SRC
        assert name == "paper_muonq", f"{name}: its package is missing from the test environment"
        with pytest.raises(RuntimeError, match=REFERENCE_ENV):
            make_optimizer(get_variant(name), model, lr=3e-3)
        return
    opt = make_optimizer(get_variant(name), model, lr=3e-3)
    c_attn = model.transformer.h[0].attn.c_attn.weight
    c_attn_before = c_attn.detach().clone()
    ids = torch.randint(0, 4096, (2, 32), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(4):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert not torch.equal(c_attn, c_attn_before)  # every peer trains the model's own weights
    if name == "paper_muonq":  # its Muon state is on transposed views of the model's Conv1D weights
        states = [s for s in opt.state.values() if s.get("use_muon") and "momentum_res" in s]
        assert len(states) == 4 * len(model.transformer.h)  # c_attn, attn c_proj, c_fc, mlp c_proj
        view = next(v for v, p in opt.transposed if p is c_attn)
        assert view.data_ptr() == c_attn.data_ptr() and view.shape == c_attn.shape[::-1]
    if name == "bnb_adamw8bit_hf":
        wte = model.transformer.wte.weight
        assert opt.state[wte]["state1"].dtype == torch.float32  # the Trainer's 32-bit override for embeddings
        fc = model.transformer.h[0].mlp.c_fc.weight
        assert opt.state[fc]["state1"].dtype == torch.uint8
    if name in ("torch_muon", "keller_muon"):
        muon_state = [p for g in opt.param_groups if g.get("use_muon") or "adjust_lr_fn" in g for p in g["params"]]
        assert muon_state and all("momentum_buffer" in opt.state[p] for p in muon_state)
        assert all(p is not model.transformer.wte.weight for p in muon_state)  # embeddings stay with AdamW


def test_gpu_check_runs_its_code_paths_on_cpu(tmp_path, one_thread, monkeypatch):
    """`python -m benchmarks gpu` is the one command a GPU session runs: its checks, speed and peak tables run
    here on the CPU (device cpu, tiny shapes), write gpu.json and gpu.md, and every check passes. A peer whose
    package the machine lacks (the GPU image has no muon-optimizer) is left out and named, not an error."""
    import benchmarks.gpu as gpu

    monkeypatch.setattr(gpu, "installed", lambda kind: kind != "keller_muon")
    main(["gpu", "--out", str(tmp_path), "--device", "cpu", "--quick"])
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert set(report["checks"]) == {"codec_4bit", "newton_schulz_bf16", "optimizer_vs_cpu", "resume_bit_exact",
                                     "adamw_8bit_codec", "host_syncs", "cuda_graph_vs_eager"}
    assert all(r["ok"] for r in report["checks"].values()), report["checks"]
    assert report["checks"]["host_syncs"] == {"ok": True, "skipped": "no CUDA device"}
    launches = report["launches"]["gpt2-tiny"]["rows"]  # the peer left out here too; MuonQ's groups counted
    assert "keller_muon" not in launches and launches["muonq"]["launches"] < launches["muonq_unbatched"]["launches"]
    rows = report["speed"]["gpt2-tiny"]["rows"]
    assert {"torch_muon", "muonq", "muonq_adam8"} <= set(rows) and rows["torch_muon"]["ratio_vs_torch_muon"] == 1.0
    assert "keller_muon" not in rows and report["rows_not_installed"] == ["keller_muon"]
    moe = report["speed"]["qwen3-moe-tiny"]["rows"]  # 3-D experts: torch.optim.Muon's row steps them by AdamW
    assert {"torch_muon", "muonq", "adamw"} <= set(moe) and all(r["median_s"] > 0 for r in moe.values())
    peak = report["peak"]["gpt2-tiny"]["rows"]
    assert peak["none"]["state"] == 0 and all(r["peak"] > 0 for r in peak.values())
    md = (tmp_path / "gpu.md").read_text()
    assert "torch.optim.Muon takes 2-D parameters only" in md
    assert "## Checks" in md and "Rows left out (package not installed here): keller_muon" in md


def test_low_precision_runs_are_run_clm_command_lines_and_the_bf16_peer_steps_bf16_weights(tmp_path, one_thread):
    """``python -m benchmarks lowprec``'s training runs: each command parses as run_clm's flags, keeps the weights in
    the dtype its row says and passes its weight_update; torchao's row is its AdamW8bit with bf16 stochastic
    rounding, which trains bf16 weights."""
    from transformers import HfArgumentParser, TrainingArguments

    from benchmarks.low_precision import MODES, command

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    try:
        from run_clm import DataArguments, ModelArguments
    finally:
        sys.path.pop(0)
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    for row, (_, options) in MODES.items():
        args = command(row, tmp_path / row, 8, 1, 32, 0.002)[2:]  # after the interpreter and the script
        model_args, _, training = parser.parse_args_into_dataclasses(args=args)
        assert model_args.torch_dtype == ("float32" if row == "fp32_master" else "bfloat16"), row
        assert training.bf16 == (row == "fp32_master") and training.learning_rate == 0.002, row
        assert (training.optim_args or "") == ",".join(f"{k}={v}" for k, v in options.items()), row
    model = build_model("gpt2-tiny").to(torch.bfloat16)
    opt = make_optimizer(get_variant("torchao_adamw8bit_bf16sr"), model, lr=3e-3)
    assert opt.bf16_stochastic_round  # torchao keeps the option on the optimizer
    before = model.transformer.h[0].mlp.c_fc.weight.detach().clone()
    ids = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert not torch.equal(model.transformer.h[0].mlp.c_fc.weight, before)
