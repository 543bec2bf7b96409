"""FSDP2 (fully_shard) support: row-sharded quantized state, distributed Newton-Schulz, resharding checkpoints.

One `torchrun --nproc_per_node 2` world (gloo, CPU) runs tests/scripts/fsdp_worker.py; the single-process halves
of the resharding checks (save on 1 -> load on 2, save on 2 -> load on 1) run here, in the test process.

Tolerance of the 2-rank vs 1-process comparisons. Both runs do the same fp32 arithmetic except the order of
sums: the gradient (two half-batch means averaged vs one mean), and the all-reduced norms, Gram matrices and R.
Each differs by a few fp32 ulps (~1e-7 relative); through 6 steps of normalization, Newton-Schulz and 4-bit
rounding (a code flips only when a value sits within ~1e-7 of a rounding boundary) the weights move apart by
~3e-7 relative (measured; the dequantized momenta stay bit-identical). We allow 1e-5: 30x headroom, and still far
below what a distributed bug gives -- the negative control (the same run with the all-reduces removed) lands ~1
away. Caveat found on the way: a rank-deficient momentum (e.g. the gradient of a layer feeding a 1-output head)
makes the low-rank split's basis depend on rounding noise in any run, so the toy loss keeps gradients full-rank.
"""

from __future__ import annotations

import json

import pytest
import torch
from fsdp_common import (
    HALF,
    STEPS,
    checkpoint_and_run_world,
    dcp_state,
    make_model,
    make_optimizer,
    momenta,
    train,
)
from launch import run_two_ranks, worker_env

TOL = 1e-5


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Run the 2-rank worker once; returns (results, out_dir)."""
    out = tmp_path_factory.mktemp("fsdp2")
    return checkpoint_and_run_world("fsdp_worker.py", str(out)), out


@pytest.mark.parametrize("config", ["muonq", "muon32"])
def test_two_ranks_match_one_process(world, config):
    res = world[0][config]
    losses, ref = torch.tensor(res["losses"]), torch.tensor(res["ref_losses"])
    assert torch.allclose(losses, ref, rtol=TOL, atol=0), (losses, ref)
    assert res["weights_rel_diff"] < TOL, res
    assert res["momentum_rel_diff"] < TOL, res
    assert ref[-1] < ref[0], "the toy problem must actually train"


def test_collectives_per_step_grow_with_rounds_not_matrices(world):
    """A 12-layer GPT-2 (48 Muon matrices) under 2-rank FSDP2: one optimizer step makes at most 24 torch.distributed
    calls (a dozen per matrix, 385, when each matrix made its own reductions, gathers and scatters)."""
    counted = world[0]["collectives_per_step"]
    assert counted["muon_params"] == 48, counted
    assert counted["total"] <= 24, counted


def test_equivalence_tolerance_can_fail(world):
    """An owner that assembled each matrix from its own rows only (the other rank's rows zero) would differ by far
    more than TOL: the equivalence test can fail."""
    assert world[0]["broken_reducer_weights_rel_diff"] > 100 * TOL, world[0]["broken_reducer_weights_rel_diff"]


def test_bf16_weights_under_fsdp2_take_the_one_process_updates(world):
    """bf16 weights without an fp32 master copy, 6 steps of given gradients on 2 ranks against one process: equal
    bit for bit. Stochastic rounding keys its noise by each element's place in the whole parameter, so the shards
    draw what one process draws (other noise keys, the control, round a good share of the elements otherwise).
    Kahan buffers are DTensors laid out like their weights, and a sharded checkpoint of them resumes bit-exactly."""
    low = world[0]["low_precision"]
    assert low["stochastic_difference"] is None, low["stochastic_difference"]
    assert low["other_noise_differing"] > 0.05, low
    assert low["kahan_difference"] is None, low["kahan_difference"]
    assert low["buffers_like_weights"], low
    assert low["kahan_resume_difference"] is None, low["kahan_resume_difference"]


def test_state_is_row_sharded_and_replicated(world):
    res = world[0]
    assert res["state_layout_ok"], "row-sharded entries must be DTensors with the parameter's mesh/placements"
    assert res["state_replicated_ok"], "plain (replicated) state entries must be identical on every rank"


def test_per_rank_muon_state_memory_halves(world):
    """Per-rank Muon state ~ 1/world of the single-process state: only R and per-matrix scales are replicated."""
    res = world[0]
    single = res["muon_bytes_single"]
    for b in res["muon_bytes_rank"]:
        assert b < 0.62 * single, (b, single)
    assert sum(res["muon_bytes_rank"]) < 1.25 * single  # replication overhead (R, scales) stays small


@pytest.mark.parametrize("kind", ["sharded", "full"])
def test_resume_two_to_two_bit_exact(world, kind):
    res = world[0]
    assert res[f"fake_step_weight_difference_{kind}"] is None, res[f"fake_step_weight_difference_{kind}"]
    assert res[f"resume_momenta_difference_{kind}"] is None, res[f"resume_momenta_difference_{kind}"]
    assert res[f"resume_2to2_weights_difference_{kind}"] is None, res[f"resume_2to2_weights_difference_{kind}"]
    assert res[f"resume_2to2_state_difference_{kind}"] is None, res[f"resume_2to2_state_difference_{kind}"]


def test_resume_one_to_two(world):
    res = world[0]
    assert res["resume_1to2_momenta_difference"] is None, res["resume_1to2_momenta_difference"]
    assert res["resume_1to2_weights_rel_diff"] < TOL, res["resume_1to2_weights_rel_diff"]


@pytest.mark.parametrize("kind", ["sharded", "full"])
def test_resume_two_to_one(world, kind):
    """A 2-rank checkpoint loads in one process (no FSDP) with the same dequantized momentum, then trains."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    out = world[1]
    model = make_model(seed=1)
    opt = make_optimizer(model, "muonq")
    if kind == "sharded":
        sd = dcp_state(model, opt)
        dcp.load(sd, checkpoint_id=str(out / "ckpt2_sharded"))
        options = StateDictOptions()
    else:
        sd = torch.load(out / "ckpt2_full.pt", weights_only=True)
        options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, sd["model"], options=options)
    set_optimizer_state_dict(model, opt, sd["optim"], options=options)
    saved = torch.load(out / "ckpt2_momenta.pt", weights_only=True)
    got = momenta(opt)
    assert got.keys() == saved.keys()
    for i in saved:
        assert torch.equal(got[i], saved[i]), i
    losses = train(model, opt, range(HALF, STEPS))
    ref_model = make_model()
    ref_opt = make_optimizer(ref_model, "muonq")
    ref_losses = train(ref_model, ref_opt, range(STEPS))[HALF:]
    assert torch.allclose(torch.tensor(losses), torch.tensor(ref_losses), rtol=TOL, atol=0)


def test_a_column_sharded_matrix_takes_the_one_process_step(world):
    """Shard(1) (tensor parallel's rowwise layout) on the 2-rank mesh: the gradient is gathered whole, the rows
    step on their ranks and the update is cut back to columns: within 1e-5 of one process after 2 steps."""
    assert world[0]["columns_weights_rel_diff"] < TOL, world[0]["columns_weights_rel_diff"]


def test_a_partial_placement_is_refused_by_name(world):
    err = world[0]["partial_error"]
    assert err is not None and "Partial" in err and "pending reduction" in err, err


@pytest.mark.parametrize(("case", "message"), [
    ("adamw8_columns", "adamw_bits=8 needs the rows of a parameter whole on each rank"),
    ("stochastic_strided", "weight_update='stochastic' keys its noise by each element's place"),
])
def test_a_layout_the_step_cannot_take_is_refused_before_anything_changes(world, case, message):
    """8-bit AdamW moments of a column-sharded tensor, stochastic weight updates of a strided (colwise tensor
    parallel) shard: refused by name before the Muon matrix listed before them steps."""
    refusals = world[0]["layout_refusals"]
    assert refusals[case] is not None and message in refusals[case] and "No state or weight" in refusals[case], refusals
    assert refusals[f"{case}_changed_nothing"], refusals


def test_cuda_graph_refused_under_fsdp2(world):
    err = world[0]["graph_error"]
    assert err is not None and "cuda_graph=True records the step of one process" in err and "FSDP2Backend" in err, err
    assert world[0]["graph_refusal_changed_nothing"]


def test_nonfinite_gradient_on_one_rank_stops_all_ranks(world):
    assert world[0]["nonfinite_raised_all_ranks"]


def test_fsdp1_wrapped_model_refused_by_the_trainer_path():
    """FSDP1 with use_orig_params hands out 1-D shard views: the --optim muonq factory must refuse the model.

    FSDP1 cannot be built on a CPU-only machine, so the wrapper is created without its __init__: only its type
    matters to the check."""
    from types import SimpleNamespace

    from torch.distributed.fsdp import FullyShardedDataParallel

    from muonq_hf.hf import optimizer_cls_and_kwargs

    wrapper = FullyShardedDataParallel.__new__(FullyShardedDataParallel)
    torch.nn.Module.__init__(wrapper)
    model = torch.nn.Sequential(wrapper, torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="FSDP1.*fsdp_version: 2"):
        optimizer_cls_and_kwargs(SimpleNamespace(optim_args=None, seed=0, weight_decay=0.0), model)


def test_fsdp1_refused():
    from muonq_hf import MuonQ
    from muonq_hf.backends import check_fsdp_plugin, check_parameter

    flat = torch.nn.Parameter(torch.zeros(10))
    flat._is_flat_param = True
    with pytest.raises(ValueError, match="FSDP1.*fully_shard"):
        check_parameter(flat)
    with pytest.raises(ValueError, match="FSDP1.*fully_shard"):
        MuonQ([dict(params=[flat], use_muon=False)]).step()

    class Plugin:
        fsdp_version = 1

    with pytest.raises(ValueError, match="fsdp_version=1.*fsdp_version: 2"):
        check_fsdp_plugin(Plugin())


# ------------------------------------------------------------------------------------- HF Trainer + FSDP2
@pytest.fixture(scope="module")
def trainer_world(tmp_path_factory):
    """`--optim muonq --fsdp full_shard` on 2 CPU ranks (tests/accelerate_cpu_fixture.py enables FSDP on CPU)."""
    out = tmp_path_factory.mktemp("fsdp_trainer")
    run_two_ranks("fsdp_trainer_worker.py", env=worker_env(FSDP_OUT=str(out)))
    results = []
    for rank in range(2):
        with open(out / f"trainer_rank{rank}.json") as f:
            results.append(json.load(f))
    return results


@pytest.mark.parametrize("kind", ["FULL_STATE_DICT", "SHARDED_STATE_DICT"])
def test_trainer_fsdp2_trains_and_resumes_bit_exactly(trainer_world, kind):
    for res in trainer_world:
        r = res[kind]
        assert r["is_fsdp_enabled"] and r["distributed_type"] == "DistributedType.FSDP", r  # no silent DDP
        assert r["fsdp_version"] == 2 and r["state_dict_type"].endswith(kind), r
        assert r["is_muonq"] and r["muon_params"] == 8, r  # 2 layers x (c_attn, attn c_proj, c_fc, mlp c_proj)
        assert r["muon_params_dtensor"] and r["muon_codes_dtensor"], r
        assert len(r["losses"]) == 4 and all(torch.isfinite(torch.tensor(r["losses"]))), r
        assert r["resumed_equal"], r["resumed_max_diff"]
