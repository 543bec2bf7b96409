"""DDP worker (torchrun --nproc_per_node 2) for tests/test_ddp_sharded.py: MuonQ(ddp_shard_state=True), ZeRO-1 by
whole tensors, against replicated MuonQ under DDP and against one process; checkpoints 2 -> 2, 1 -> 2 and the
2-rank half of 2 -> 1. Rank 0 writes results.json into --out.

Usage: torchrun --nproc_per_node 2 tests/scripts/ddp_worker.py --out DIR --ckpt1 DIR_OF_1_PROCESS_CHECKPOINT
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from fsdp_common import (
    FULL,
    HALF,
    SHARDED,
    STEPS,
    counted_collectives,
    first_difference,
    full_state,
    make_model,
    make_optimizer,
    max_rel_diff,
    momenta,
    train,
    weights,
    write_results_and_finish,
)
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.nn.parallel import DistributedDataParallel as DDP

from muonq_hf import state_bytes
from muonq_hf.backends.common import row_ranges


def ddp(config: str, shard: bool, seed: int = 0):
    model = DDP(make_model(seed))
    return model, make_optimizer(model.module, config, ddp_shard_state=shard)


def _gathered(opt):
    return opt.full_state()  # collective with ddp_shard_state, nothing to gather without


def all_momenta(opt) -> dict:
    """Dequantized momenta of every matrix, borrowed from their owners (collective)."""
    with _gathered(opt):
        return momenta(opt)


def all_state(opt) -> dict:
    with _gathered(opt):
        return full_state(opt)


def layout_ok(opt, rank: int, world: int) -> bool:
    """Muon states on their owner only; AdamW states hold exactly this rank's rows."""
    params = [p for g in opt.param_groups for p in g["params"]]
    ok = True
    for owner, p in zip(opt._backend().owners(opt._tasks()), params, strict=True):
        if owner is not None:
            ok &= bool(opt.state.get(p)) == (owner == rank)
        else:
            count = row_ranges(p.shape[0], world)[rank][1]
            ok &= all(v.shape[0] == count for v in opt.state.get(p, {}).values() if v.ndim)
    return bool(ok)




def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--ckpt1", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    res: dict = {}

    for config in ("muonq", "muon32"):
        ref_model = make_model()
        ref_opt = make_optimizer(ref_model, config)
        ref_losses = train(ref_model, ref_opt, range(STEPS))
        rep_model, rep_opt = ddp(config, shard=False)
        rep_losses = train(rep_model, rep_opt, range(STEPS), rank, world)
        model, opt = ddp(config, shard=True)
        losses = train(model, opt, range(STEPS), rank, world)
        owned = sum(1 for g in opt.param_groups if g["use_muon"] for p in g["params"] if p in opt.state)
        counts = torch.tensor([owned])
        dist.all_reduce(counts)
        ok = torch.tensor([int(layout_ok(opt, rank, world))])
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        res[config] = {
            "ref_losses": ref_losses,
            "losses": losses,
            "sharded_vs_replicated_difference": (None if losses == rep_losses else f"losses {losses} vs {rep_losses}")
            or first_difference(weights(model.module), weights(rep_model.module), "weights")
            or first_difference(all_state(opt), full_state(rep_opt), "state"),
            "weights_rel_diff": max_rel_diff(weights(model.module), weights(ref_model)),
            "momentum_rel_diff": max_rel_diff(all_momenta(opt), momenta(ref_opt)),
            "state_bytes_sharded": state_bytes(opt)["total"],
            "state_bytes_replicated": state_bytes(rep_opt)["total"],
            "owned_muon_total": int(counts),
            "n_muon": sum(len(g["params"]) for g in opt.param_groups if g["use_muon"]),
            "n_params": sum(len(g["params"]) for g in opt.param_groups),
            "layout_ok": bool(int(ok)),
        }
        sizes = torch.tensor([state_bytes(opt)["total"]])
        parts = [torch.zeros_like(sizes) for _ in range(world)]
        dist.all_gather(parts, sizes)
        res[config]["state_bytes_sharded_ranks"] = [int(x) for x in parts]

    # collectives of one sharded step: the new values go out in one broadcast per source rank and bucket
    model, opt = ddp("muonq", shard=True)
    train(model, opt, range(2), rank, world)
    with counted_collectives() as calls:
        train(model, opt, range(2, 3), rank, world)  # (the loss all-reduce of train() is counted too)
    res["collectives_per_step"] = calls
    res["tensors_stepped"] = sum(len(g["params"]) for g in opt.param_groups)

    # ------------------------------------------------------------------------------------ checkpoints
    model, opt = ddp("muonq", shard=True)
    train(model, opt, range(HALF), rank, world)
    sharded_dir = os.path.join(args.out, "ckpt2_sharded")
    dcp.save(
        {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt, options=SHARDED)},
        checkpoint_id=sharded_dir,
    )
    full_osd = get_optimizer_state_dict(model, opt, options=FULL)
    plain_osd = opt.state_dict()  # collective: the full state on every rank (torch.save-able)
    mid = all_momenta(opt)
    if rank == 0:
        torch.save({"optim": full_osd, "plain": plain_osd}, os.path.join(args.out, "ckpt2_full.pt"))
        torch.save(mid, os.path.join(args.out, "ckpt2_momenta.pt"))
    train(model, opt, range(HALF, STEPS), rank, world)
    final_w, final_s = weights(model.module), all_state(opt)
    dist.barrier()

    for kind in ("sharded", "full", "plain"):
        model, opt = ddp("muonq", shard=True, seed=1)
        if kind == "sharded":
            sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt, options=SHARDED)}
            dcp.load(sd, checkpoint_id=sharded_dir)
            set_model_state_dict(model, sd["model"])
            before = weights(model.module)
            set_optimizer_state_dict(model, opt, sd["optim"], options=SHARDED)
        else:
            saved = torch.load(os.path.join(args.out, "ckpt2_full.pt"), weights_only=True)
            dcp_sd = {"model": get_model_state_dict(model)}
            dcp.load(dcp_sd, checkpoint_id=sharded_dir)
            set_model_state_dict(model, dcp_sd["model"])
            before = weights(model.module)
            if kind == "full":
                set_optimizer_state_dict(model, opt, saved["optim"] if rank == 0 else {}, options=FULL)
            else:
                opt.load_state_dict(saved["plain"])
        res[f"fake_step_weight_difference_{kind}"] = first_difference(weights(model.module), before)
        res[f"state_is_sharded_after_load_{kind}"] = layout_ok(opt, rank, world)
        res[f"resume_momenta_difference_{kind}"] = first_difference(all_momenta(opt), mid)
        train(model, opt, range(HALF, STEPS), rank, world)
        res[f"resume_2to2_weights_difference_{kind}"] = first_difference(weights(model.module), final_w)
        res[f"resume_2to2_state_difference_{kind}"] = first_difference(all_state(opt), final_s)

    # 1 -> 2
    model, opt = ddp("muonq", shard=True, seed=1)
    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt, options=SHARDED)}
    dcp.load(sd, checkpoint_id=args.ckpt1)
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"], options=SHARDED)
    ref1 = torch.load(args.ckpt1 + "_momenta.pt", weights_only=True)
    res["resume_1to2_momenta_difference"] = first_difference(all_momenta(opt), ref1)
    train(model, opt, range(HALF, STEPS), rank, world)
    ref_model = make_model()
    ref_opt = make_optimizer(ref_model, "muonq")
    train(ref_model, ref_opt, range(STEPS))
    res["resume_1to2_weights_rel_diff"] = max_rel_diff(weights(model.module), weights(ref_model))

    # ---------------------------------------------------------------- a non-finite gradient on one rank only
    for mode in ("error", "skip"):
        model, opt = ddp("muonq", shard=True)
        opt.nonfinite = mode
        logits, value = model(torch.zeros(2, 3, dtype=torch.long))
        (logits.mean() + value.sum()).backward()  # every parameter used: DDP reduces every bucket in backward
        if rank == 1:
            model.module.fc1.weight.grad.fill_(float("nan"))  # after DDP's all-reduce: this rank only
        try:
            opt.step()
            raised = False
        except FloatingPointError:
            raised = True
        flags = torch.tensor([int(raised), opt.skipped_steps])
        dist.all_reduce(flags)
        res[f"nonfinite_{mode}_all_ranks"] = flags.tolist()  # [ranks that raised, ranks that skipped]

    write_results_and_finish(res, args.out, rank)


if __name__ == "__main__":
    main()
