"""DDP with MuonQ(ddp_shard_state=True) (ZeRO-1): Muon matrices owned whole by one rank, AdamW tensors split by rows.

One `torchrun --nproc_per_node 2` world (gloo, CPU) runs tests/scripts/ddp_worker.py. The sharded optimizer does
the very same arithmetic as the replicated one on the owner rank and broadcasts the result, so it must equal
replicated MuonQ under DDP bit for bit; against one process the only differences are the order of the gradient
all-reduce sums (fp32 ulps), hence the same tolerance as tests/test_fsdp2.py (measured ~2e-6, allowed 1e-5).
"""

from __future__ import annotations

import pytest
import torch
from fsdp_common import (
    checkpoint_and_run_world,
    dcp_state,
    make_model,
    make_optimizer,
    momenta,
)

TOL = 1e-5


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    return checkpoint_and_run_world("ddp_worker.py", str(out)), out


@pytest.mark.parametrize("config", ["muonq", "muon32"])
def test_sharded_equals_replicated_and_one_process(world, config):
    res = world[0][config]
    assert res["sharded_vs_replicated_difference"] is None, res["sharded_vs_replicated_difference"]  # not one bit
    assert torch.allclose(torch.tensor(res["losses"]), torch.tensor(res["ref_losses"]), rtol=TOL, atol=0), res
    assert res["weights_rel_diff"] < TOL, res
    assert res["momentum_rel_diff"] < TOL, res


@pytest.mark.parametrize("config", ["muonq", "muon32"])
def test_state_is_split_and_memory_drops(world, config):
    """Each Muon matrix's state on exactly one rank, AdamW moments split by rows; nothing held twice except
    the AdamW step counters (4 bytes per tensor per rank)."""
    res = world[0][config]
    assert res["owned_muon_total"] == res["n_muon"], "every Muon matrix's state lives on exactly one rank"
    assert res["layout_ok"]
    extra = sum(res["state_bytes_sharded_ranks"]) - res["state_bytes_replicated"]
    assert 0 <= extra <= 4 * res["n_params"] * (len(res["state_bytes_sharded_ranks"]) - 1), extra
    assert max(res["state_bytes_sharded_ranks"]) < 0.7 * res["state_bytes_replicated"]


def test_new_values_go_out_in_one_broadcast_per_source_rank(world):
    """Each rank's new values (its Muon matrices, its rows of the AdamW tensors) go out in one packed broadcast
    (the toy model's parameters fit one bucket): 2 broadcasts on 2 ranks for 15 tensors, where one per tensor (and
    per rank for AdamW rows) made 20. The all-reduces: the non-finite decision and the training loop's loss."""
    calls, tensors = world[0]["collectives_per_step"], world[0]["tensors_stepped"]
    assert tensors == 15, tensors
    assert calls.get("broadcast") == 2 and calls.get("all_reduce") == 2, calls
    assert set(calls) <= {"broadcast", "all_reduce"}, calls


@pytest.mark.parametrize("kind", ["sharded", "full", "plain"])
def test_resume_two_to_two_bit_exact(world, kind):
    """DCP sharded and full state dicts, and plain optimizer.state_dict()/load_state_dict (collective)."""
    res = world[0]
    assert res[f"fake_step_weight_difference_{kind}"] is None, res[f"fake_step_weight_difference_{kind}"]
    assert res[f"state_is_sharded_after_load_{kind}"], "after a load each rank keeps only the state it owns"
    assert res[f"resume_momenta_difference_{kind}"] is None, res[f"resume_momenta_difference_{kind}"]
    assert res[f"resume_2to2_weights_difference_{kind}"] is None, res[f"resume_2to2_weights_difference_{kind}"]
    assert res[f"resume_2to2_state_difference_{kind}"] is None, res[f"resume_2to2_state_difference_{kind}"]


def test_resume_one_to_two(world):
    res = world[0]
    assert res["resume_1to2_momenta_difference"] is None, res["resume_1to2_momenta_difference"]
    assert res["resume_1to2_weights_rel_diff"] < TOL


@pytest.mark.parametrize("kind", ["sharded", "plain"])
def test_resume_two_to_one(world, kind):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    out = world[1]
    model = make_model(seed=1)
    opt = make_optimizer(model, "muonq", ddp_shard_state=True)  # no process group: the single-process path
    sd = dcp_state(model, opt)
    dcp.load(sd, checkpoint_id=str(out / "ckpt2_sharded"))
    set_model_state_dict(model, sd["model"])
    if kind == "sharded":
        set_optimizer_state_dict(model, opt, sd["optim"])
    else:
        opt.load_state_dict(torch.load(out / "ckpt2_full.pt", weights_only=True)["plain"])
    saved = torch.load(out / "ckpt2_momenta.pt", weights_only=True)
    got = momenta(opt)
    assert got.keys() == saved.keys()
    assert all(torch.equal(got[i], saved[i]) for i in saved)


def test_nonfinite_gradient_on_one_rank_gives_the_same_decision_on_every_rank(world):
    """It used to deadlock: the clean rank stepped into the owners' broadcasts while the other raised."""
    res = world[0]
    assert res["nonfinite_error_all_ranks"] == [2, 0], res["nonfinite_error_all_ranks"]
    assert res["nonfinite_skip_all_ranks"] == [0, 2], res["nonfinite_skip_all_ranks"]
