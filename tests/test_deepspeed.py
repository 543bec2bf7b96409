"""MuonQ under DeepSpeed ZeRO 1/2/3 on 2 CPU ranks (gloo): equivalence, NS once per step, resume, refusals.

The 2-rank runs (tests/scripts/ds_engine_worker.py, one torchrun launch for all scenarios and both stages)
compare DeepSpeedMuonQ with single-process MuonQ on the same tiny GPT-2 (fused-QKV Conv1D, tied embeddings).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from launch import accelerate_launch, torchrun_two, worker_env

pytest.importorskip("deepspeed")

from muonq_hf import MuonQ, param_groups
from muonq_hf.backends.common import assign_owners
from muonq_hf.deepspeed import (
    DeepSpeedConfigError,
    DeepSpeedMuonQ,
    check_deepspeed_config,
    trainer_optimizer_cls,
)

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "scripts" / "ds_engine_worker.py"
TRAINER_WORKER = ROOT / "tests" / "scripts" / "ds_trainer_worker.py"
SCENARIOS = "fp32,split,bf16,resume,plain,moe,gqa,reshape,reshape8"
STAGES = (1, 2, 3)
TRAINER_STAGES = (1, 2, 3)


def torchrun(script: Path, args: list[str], out: Path, extra_env: dict | None = None) -> None:
    torchrun_two(str(script), *args, env=worker_env(DS_ACCELERATOR="cpu", DS_OUT=str(out), **(extra_env or {})))


@pytest.fixture(scope="module")
def ds_runs(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("ds")
    torchrun(WORKER, [SCENARIOS], out, {"DS_STAGES": ",".join(map(str, STAGES))})
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


# ------------------------------------------------------------------------------------------ 2-rank runs
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("scenario", ["fp32", "bf16"])
def test_zero_matches_single_process_bit_for_bit(ds_runs, scenario, stage):
    """Identical batches on both ranks make the all-reduced gradient exactly the single-process one
    ((g + g) / 2 == g in fp32 and bf16), and the whole-matrix reassembly is exact (one rank owns each
    element), so 4 steps of ZeRO must equal 4 steps of MuonQ bit for bit (fp32: with 2 micro-batches of
    gradient accumulation; bf16: against MuonQ on fp32 master copies of the bf16 model, as ZeRO keeps)."""
    out, _ = ds_runs
    ref = torch.load(out / f"{scenario}_reference.pt")
    got = torch.load(out / f"{scenario}_stage{stage}.pt")
    assert ref.keys() == got.keys()
    for name in ref:
        assert torch.equal(got[name], ref[name]), f"{name}: max diff {(got[name] - ref[name]).abs().max()}"
    init = torch.load(out / "init.pt")  # the runs trained: a test that compares two untouched models fails here
    for name in ("transformer.h.0.mlp.c_fc.weight", "transformer.h.1.attn.c_attn.weight"):
        assert (ref[name] - init[name].to(ref[name].dtype)).abs().max() > 1e-3


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("scenario", ["moe", "gqa"])
def test_zero_reassembles_experts_and_unequal_pieces_bit_for_bit(ds_runs, scenario, stage):
    """Qwen3-MoE (stacked experts with gate/up halves) and Phi-3 (grouped-query qkv_proj, pieces of unequal
    sizes): the owner reassembles each whole tensor from the flat partitions and runs the same per-expert,
    per-piece MuonQ step as one process, so identical batches give the single-process weights bit for bit;
    every expert x piece's first update is orthogonalized (singular values <= 1.25, NS's band)."""
    out, ranks = ds_runs
    got = torch.load(out / f"{scenario}_stage{stage}.pt")
    if stage == 3:
        # ZeRO-3's nn.Linear weight gradients are an ulp off torch's (~4e-9 of ~1e-2, measured): fp32 state and NS,
        # compared within fp32 rounding: 1e-6 on weights of ~0.1 after 4 steps. AdamW-routed embeddings get 5e-6:
        # g / (sqrt(v) + eps) lifts the ulp noise of rows that the batch barely touches (|g| near eps)
        ref = torch.load(out / f"{scenario}_reference_fp32state.pt")
        for name in ref:
            atol = 5e-6 if "embed" in name or "lm_head" in name else 1e-6
            torch.testing.assert_close(got[name], ref[name], rtol=0, atol=atol, msg=name)
    else:
        ref = torch.load(out / f"{scenario}_reference.pt")
        for name in ref:
            assert torch.equal(got[name], ref[name]), f"{name}: max diff {(got[name] - ref[name]).abs().max()}"
    init = torch.load(out / f"{scenario}_init.pt")
    planned = [n for n in ref if "experts" in n or "qkv_proj" in n]
    assert planned and all((ref[n] - init[n]).abs().max() > 1e-3 for n in planned)  # the runs trained
    sv = ranks[0][f"{scenario}/stage{stage}"]["sv"]
    assert any(k in n for n in sv for k in ("experts.gate_up_proj", "qkv_proj")), sorted(sv)
    for name, values in sv.items():
        assert max(values) <= 1.25, (name, max(values))


@pytest.mark.parametrize("stage", STAGES)
def test_zero_split_batches_match_within_reduction_rounding(ds_runs, stage):
    """Each rank gets half of the batch (bits=32 momentum, no codec rounding to amplify): the only difference
    from single-process MuonQ is the fp32 summation order of the gradient (two half-batch means averaged),
    ~1e-7 relative; NS and Adam carry it through 4 steps at lr 0.02 to ~1e-7 absolute on weights of ~0.1.
    Excluded: the key third of GPT-2's c_attn bias, whose exact gradient is zero (softmax ignores a per-query
    constant), so its fp32 noise of ~1e-9 sits at Adam's eps=1e-8 and g/(|g|+eps) is dominated by rounding."""
    out, _ = ds_runs
    ref = torch.load(out / "split_reference.pt")
    got = torch.load(out / f"split_stage{stage}.pt")
    d = ref["transformer.wte.weight"].shape[1]
    for name in ref:
        a, b = got[name], ref[name]
        if name.endswith("attn.c_attn.bias"):
            a, b = torch.cat([a[:d], a[2 * d :]]), torch.cat([b[:d], b[2 * d :]])
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    assert not torch.equal(got["transformer.h.0.mlp.c_fc.weight"], torch.load(out / "fp32_reference.pt")[
        "transformer.h.0.mlp.c_fc.weight"])  # the split run trained on different data: not a copied file


@pytest.mark.parametrize("stage", STAGES)
def test_muonq_steps_once_per_optimizer_step_with_state_split_by_matrix(ds_runs, stage):
    """The optimizer that steps is DeepSpeedMuonQ (the worker asserts engine.optimizer.optimizer is it); each
    rank orthogonalizes its own matrices once per optimizer step, never per micro-batch (fp32 run: 4 steps x
    2 micro-batches), and holds only their packed 4-bit momentum."""
    _, ranks = ds_runs
    n_matrices = 8  # GPT-2, 2 layers: attn.c_proj, mlp.c_fc, mlp.c_proj (3 each) + c_attn (1 each)
    calls = [r[f"fp32/stage{stage}"]["ns_calls"] for r in ranks]
    assert calls == [4 * n_matrices // 2] * 2
    owned = [{k.split(".")[1] for k in r[f"fp32/stage{stage}"]["packed"] if ".m" in k} for r in ranks]
    # group 0 per layer: attn.c_proj (40, 40), c_fc (40, 160), mlp.c_proj (160, 40); group 1: the two c_attn
    # (40, 120, split in q/k/v). Owners balance state bytes within each group (DeepSpeed steps group by group).
    owners = assign_owners([1600.0, 6400.0, 6400.0] * 2, 2) + assign_owners([4800.0] * 2, 2)
    assert owned == [{f"m{i}" for i, r in enumerate(owners) if r == rank} for rank in (0, 1)], owned
    assert owned[0] | owned[1] == {f"m{i}" for i in range(8)} and not owned[0] & owned[1]
    assert owned[0] == {"m0", "m1", "m4", "m6"}, owned  # 1600 + 2 x 6400 (+ one c_attn) on each rank
    size = {"torch.uint8": 1, "torch.float16": 2, "torch.float32": 4}
    muon_bytes = [sum(math.prod(shape) * size[dtype] for k, (dtype, shape) in r[f"fp32/stage{stage}"]["packed"].items()
                      if ".m" in k) for r in ranks]
    assert muon_bytes[0] == muon_bytes[1] > 0, muon_bytes  # per rank half of the packed Muon state (measured 10396 B)
    for r in ranks:
        packed = r[f"fp32/stage{stage}"]["packed"]
        assert all(dtype == "torch.uint8" for k, (dtype, _) in packed.items() if k.endswith("_codes"))
        assert not any(k.endswith((".res", ".momentum_buffer")) for k in packed)  # no fp32 momentum anywhere


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("scenario", ["fp32", "bf16"])
def test_muon_groups_get_orthogonalized_updates(ds_runs, scenario, stage):
    """The first update applied to each Muon matrix, recovered from the weights as (W0 (1-lr wd) - W1) /
    (lr 0.2 sqrt(max(m, n))), for every piece of the fused QKV too: Newton-Schulz puts its singular values
    in about [0.7, 1.2]. All must stay <= 1.25 and at least 80% must exceed 0.6; the rest is the gradient's
    (near-)null space, which NS cannot inflate (LayerNorm outputs are zero-mean, so e.g. c_fc's gradient has
    rank <= d - 1). An SGD step has the gradient's decaying spectrum, an AdamW step (entries ~ +-1) singular
    values ~ sqrt(m) + sqrt(n) ~ 19: both fail. bf16: the weights are the fp32 masters, same band."""
    _, ranks = ds_runs
    sv = ranks[0][f"{scenario}/stage{stage}"]["sv"]
    assert len(sv) == 8 and any("c_attn" in n for n in sv)
    for name, values in sv.items():
        assert max(values) <= 1.25, (name, max(values))
        assert sum(v > 0.6 for v in values) >= 0.8 * len(values), (name, values)


@pytest.mark.parametrize("stage", STAGES)
def test_resume_through_engine_checkpoint_is_exact_and_saves_packed_state(ds_runs, stage):
    """engine.save_checkpoint at step 2, a fresh engine loads it and runs to step 4: weights and every state
    tensor equal the uninterrupted run bit for bit; each rank's optim_states file holds uint8 codes."""
    _, ranks = ds_runs
    for rank, r in enumerate(ranks):
        res = r[f"resume/stage{stage}"]
        assert res["resume_max_diff"] == 0.0
        assert res["state_equal"] is True  # also after the refused load below: it changed nothing
        # the other rank's file holds matrices this rank does not own: refused, naming them
        assert "another owner assignment; nothing was changed" in (res["foreign_owner_error"] or ""), res
        assert f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in res["files"]
        codes = {k: v for k, v in res["saved"].items() if k.endswith("_codes")}
        assert codes and set(codes.values()) == {"torch.uint8"}
        assert any(".m" in k and k.endswith("res_scale") and v == "torch.float16" for k, v in res["saved"].items())


@pytest.mark.parametrize("stage", STAGES)
def test_resume_on_another_number_of_ranks_through_the_consolidated_checkpoint(ds_runs, stage):
    """muonq_hf.deepspeed_checkpoint: 2 ranks -> one process (consolidated_state at step 2; a plain MuonQ loads
    it and runs to step 4) and one process -> 2 ranks (a one-process checkpoint at step 2 loaded into a fresh
    engine by load_consolidated_state), identical batches: the consolidated state equals the one-process state
    entry for entry, both resumed runs equal the uninterrupted ones bit for bit, and after the load each rank
    holds the packed momentum of the matrices it owns now. A checkpoint with other storage options is refused
    before anything changes."""
    _, ranks = ds_runs
    first = ranks[0][f"reshape/stage{stage}"]
    assert first["consolidated_state_equal"] is True
    assert first["two_to_one_max_diff"] == 0.0
    owners = assign_owners([1600.0, 6400.0, 6400.0] * 2, 2) + assign_owners([4800.0] * 2, 2)
    for rank, r in enumerate(ranks):
        res = r[f"reshape/stage{stage}"]
        assert res["one_to_two_max_diff"] == 0.0
        assert res["owned_after_load"] == sorted(f"m{i}" for i, o in enumerate(owners) if o == rank)
        assert "param group 0 was saved with other storage options {'bits': (8, 4)}" in res["other_options_error"]
        assert res["untouched_after_refusal"] is True


@pytest.mark.parametrize("stage", STAGES)
def test_adamw_bits_8_matches_single_process_and_moves_between_world_sizes(ds_runs, stage):
    """adamw_bits=8 under ZeRO: each AdamW tensor of the group is stepped whole on its owner (8-bit blocks run
    along rows, which flat partitions cut): 4 steps equal single-process MuonQ adamw_bits=8 bit for bit, the
    consolidated state equals the one-process state entry for entry (8-bit codes included), and 2 -> 1 and 1 -> 2
    resume bit-exactly."""
    _, ranks = ds_runs
    first = ranks[0][f"reshape8/stage{stage}"]
    assert first["consolidated_state_equal"] is True
    assert {"exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg"} <= set(first["consolidated_entries"])
    assert first["two_to_one_max_diff"] == 0.0
    for res in (r[f"reshape8/stage{stage}"] for r in ranks):
        assert res["straight_max_diff"] == 0.0 and res["one_to_two_max_diff"] == 0.0, res
        assert res["untouched_after_refusal"] is True


@pytest.mark.parametrize("stage", STAGES)
def test_plain_muonq_under_zero_refuses_instead_of_training(ds_runs, stage):
    """A plain MuonQ given to deepspeed.initialize sees flat partitions: its first step must stop with an error
    that names the cause and the fix (never a silent SGD-like update of a 1-D 'matrix'); verify_engine, the
    start-up check, refuses the same engine."""
    _, ranks = ds_runs
    for r in ranks:
        res = r[f"plain/stage{stage}"]
        assert res["error"].startswith("ValueError: use_muon=True needs tensors of >= 2 dims"), res["error"]
        assert "DeepSpeedMuonQ" in res["error"]
        assert res["verify"].startswith("DeepSpeedConfigError") and "not DeepSpeedMuonQ" in res["verify"]


# ------------------------------------------------------------------------------------------ HF Trainer
@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory) -> dict[int, list[dict]]:
    out = tmp_path_factory.mktemp("ds_trainer")
    configs = [str(ROOT / "examples" / "deepspeed" / f"zero{stage}_bf16.json") for stage in TRAINER_STAGES]
    torchrun(TRAINER_WORKER, configs, out)
    return {s: [json.loads((out / f"trainer_stage{s}_rank{r}.json").read_text()) for r in range(2)]
            for s in TRAINER_STAGES}


@pytest.mark.parametrize("stage", TRAINER_STAGES)
def test_trainer_optim_muonq_with_deepspeed_config(trainer_runs, stage):
    """``--optim muonq --deepspeed examples/deepspeed/zero{1,2,3}_bf16.json --bf16`` on 2 ranks (test-only
    Accelerate CPU fixture): the optimizer that steps is DeepSpeedMuonQ under DeepSpeed's ZeRO optimizer, NS
    runs once per optimizer step (4 steps x 2 micro-batches: 4 x 8 matrices, half per rank), and resuming the
    Trainer from checkpoint-2 reproduces the uninterrupted weights exactly."""
    zero = "DeepSpeedZeroOptimizer_Stage3" if stage == 3 else "DeepSpeedZeroOptimizer"
    hidden = [f"transformer.h.{i}.{m}.weight" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                         "mlp.c_proj")]
    for r in trainer_runs[stage]:
        assert r["distributed_type"] == "DistributedType.DEEPSPEED" and r["deepspeed_enabled"]
        assert r["zero_stage"] == stage
        assert r["chain"] == ["DeepSpeedOptimizerWrapper", zero, "DeepSpeedMuonQ"]
        # ZeRO-3: from_pretrained under zero.Init, every parameter already partitioned when MuonQ is built;
        # routed like the whole model all the same (wpe/wte to AdamW)
        assert r["partitioned_at_init"] is (stage == 3)
        assert r["muon"] == sorted(hidden), r["muon"]
        assert r["ns_calls"] == 4 * 8 // 2 and r["resumed_ns_calls"] == 2 * 8 // 2
        assert r["resume_max_diff"] == 0.0
        assert len(r["loss"]) == 4 and all(math.isfinite(x) for x in r["loss"])


def test_accelerate_launch_with_the_zero3_yaml(tmp_path):
    """``accelerate launch --config_file examples/accelerate/deepspeed_zero3.yaml`` (zero3_init_flag on, the
    DeepSpeed config from the yaml, no --deepspeed): from_pretrained builds the model under zero.Init, the
    Trainer steps DeepSpeedMuonQ under ZeRO-3 with the 8 hidden matrices on Muon, and resumes exactly."""
    accelerate_launch(str(ROOT / "examples" / "accelerate" / "deepspeed_zero3.yaml"), str(TRAINER_WORKER),
                      str(ROOT / "examples" / "deepspeed" / "zero3_bf16.json"),
                      env=worker_env(DS_ACCELERATOR="cpu", DS_OUT=str(tmp_path)))
    for rank in range(2):
        r = json.loads((tmp_path / f"trainer_stage3_rank{rank}.json").read_text())
        assert r["partitioned_at_init"] is True and r["zero_stage"] == 3
        assert r["chain"] == ["DeepSpeedOptimizerWrapper", "DeepSpeedZeroOptimizer_Stage3", "DeepSpeedMuonQ"]
        assert len(r["muon"]) == 8 and not any("wte" in n or "wpe" in n for n in r["muon"])
        assert r["ns_calls"] == 4 * 8 // 2 and r["resume_max_diff"] == 0.0


def test_trainer_refuses_offload_before_accelerate_swaps_the_optimizer(tmp_path):
    """With optimizer offload Accelerate would replace MuonQ by DeepSpeed's CPU Adam inside prepare(); the
    class lookup of --optim muonq refuses the config first (no process group needed)."""
    config = json.loads((ROOT / "examples" / "deepspeed" / "zero2_bf16.json").read_text())
    config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    args = SimpleNamespace(deepspeed=config)
    with pytest.raises(DeepSpeedConfigError, match="offload_optimizer.device='cpu'.*CPU Adam"):
        trainer_optimizer_cls(args)
    assert trainer_optimizer_cls(SimpleNamespace(deepspeed=None)) is MuonQ
    assert trainer_optimizer_cls(SimpleNamespace(deepspeed=str(ROOT / "examples/deepspeed/zero1_bf16.json"))) is (
        DeepSpeedMuonQ
    )


# ------------------------------------------------------------------------------------ start-up refusals
BASE = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}


def with_(**patch) -> dict:
    cfg = json.loads(json.dumps(BASE))
    for dotted, value in patch.items():
        node = cfg
        *path, leaf = dotted.split("__")
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return cfg


@pytest.mark.parametrize(
    "config, names",
    [
        (with_(zero_optimization__stage=0), ["zero_optimization.stage=0", "stage 1, 2 or 3", "DDP"]),
        (with_(zero_optimization__stage=4), ["zero_optimization.stage=4", "stage 1, 2 or 3"]),
        ({**BASE, "fp16": {"enabled": True}}, ["fp16.enabled=true", "bf16.enabled=true"]),
        (with_(zero_optimization__offload_optimizer={"device": "cpu"}),
         ["zero_optimization.offload_optimizer.device='cpu'", "CPU Adam", "'none'"]),
        (with_(zero_optimization__offload_param={"device": "nvme"}), ["offload_param.device='nvme'", "'none'"]),
        ({**BASE, "optimizer": {"type": "AdamW"}}, ["'optimizer' section", "type='AdamW'", "--optim muonq"]),
        (with_(zero_optimization__elastic_checkpoint=True), ["zero_optimization.elastic_checkpoint=true", "false"]),
        (with_(zero_optimization__round_robin_gradients=True), ["round_robin_gradients=true", "false"]),
        ({**BASE, "checkpoint": {"load_universal": True}}, ["checkpoint.load_universal=true", "false"]),
        (with_(zero_optimization__zenflow={"topk_ratio": 0.1}), ["zero_optimization.zenflow", "remove"]),
    ],
)
def test_unsupported_settings_refused_with_names(config, names):
    with pytest.raises(DeepSpeedConfigError) as err:
        check_deepspeed_config(config)
    for name in names:
        assert name in str(err.value)


@pytest.mark.parametrize("path", sorted((ROOT / "examples" / "deepspeed").glob("*.json")))
def test_example_configs_are_supported(path):
    config = json.loads(path.read_text())
    check_deepspeed_config(config)
    assert config["zero_optimization"]["stage"] in (1, 2, 3)


@pytest.mark.parametrize("path", sorted((ROOT / "examples" / "accelerate").glob("deepspeed_zero*.yaml")))
def test_accelerate_configs_point_to_supported_deepspeed_configs(path):
    yaml = pytest.importorskip("yaml")
    cfg = yaml.safe_load(path.read_text())
    assert cfg["distributed_type"] == "DEEPSPEED"
    ds_file = ROOT / cfg["deepspeed_config"]["deepspeed_config_file"]
    check_deepspeed_config(json.loads(ds_file.read_text()))


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def test_params_tagged_for_deepspeed_native_muon_are_refused():
    """DeepSpeed runs its own Muon on params with p.use_muon when the optimizer's class name contains 'muon',
    which 'DeepSpeedMuonQ' does: such params would be orthogonalized twice."""
    assert "muon" in DeepSpeedMuonQ.__name__.lower()
    model = tiny_model()
    model[0].weight.use_muon = True
    with pytest.raises(ValueError, match="use_muon=True.*native Muon"):
        DeepSpeedMuonQ(param_groups(model))


def test_ddp_shard_state_refused():
    with pytest.raises(ValueError, match="ddp_shard_state=True is for DDP.*drop ddp_shard_state"):
        DeepSpeedMuonQ(param_groups(tiny_model()), ddp_shard_state=True)


def test_cuda_graph_refused():
    with pytest.raises(ValueError, match="cuda_graph=True is not supported under DeepSpeed ZeRO.*cuda_graph=False"):
        DeepSpeedMuonQ(param_groups(tiny_model()), cuda_graph=True)


def test_outside_zero_it_is_muonq():
    """With real parameters in its groups (no ZeRO), DeepSpeedMuonQ takes MuonQ's own step, bit for bit."""
    a, b = tiny_model(), tiny_model()
    opt_a, opt_b = MuonQ(param_groups(a), lr=0.02), DeepSpeedMuonQ(param_groups(b), lr=0.02)
    for step in range(3):
        x = torch.randn(5, 8, generator=torch.Generator().manual_seed(step))
        for model, opt in ((a, opt_a), (b, opt_b)):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_resume_with_another_world_size_refused():
    opt = DeepSpeedMuonQ(param_groups(tiny_model()))
    sd = opt.state_dict()
    first = sd["param_groups"][0]["params"][0]
    sd["state"][first] = {"zero_world_size": 2}
    with pytest.raises(RuntimeError, match="world size of 2, now it is 1.*resume with 2 ranks"):
        opt.load_state_dict(sd)


def test_accelerate_launch_deepspeed_env_is_checked(monkeypatch):
    """``accelerate launch`` with a DeepSpeed yaml passes no --deepspeed to the Trainer: the class lookup reads
    the ACCELERATE_* environment it sets (config file, or zero stage/offload values without one)."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ROOT / "examples/deepspeed/zero2_bf16.json"))
    assert trainer_optimizer_cls(SimpleNamespace(deepspeed=None)) is DeepSpeedMuonQ
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "cpu")
    with pytest.raises(DeepSpeedConfigError, match="offload_optimizer.device='cpu'"):
        trainer_optimizer_cls(SimpleNamespace(deepspeed=None))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert trainer_optimizer_cls(SimpleNamespace(deepspeed=None)) is DeepSpeedMuonQ
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "0")
    with pytest.raises(DeepSpeedConfigError, match="zero_optimization.stage=0"):
        trainer_optimizer_cls(SimpleNamespace(deepspeed=None))
