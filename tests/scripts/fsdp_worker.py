"""FSDP2 worker (torchrun --nproc_per_node 2): every check of tests/test_fsdp2.py that needs a 2-rank world, run in
one world to pay the start-up once. Rank 0 writes results.json (and tensors) into --out; pytest asserts on them.

Usage: torchrun --nproc_per_node 2 tests/scripts/fsdp_worker.py --out DIR --ckpt1 DIR_OF_1_PROCESS_CHECKPOINT
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
    dcp_state,
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
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor

import muonq_hf.backends.fsdp2 as fsdp2_backend
from muonq_hf import MuonQ, state_bytes
from muonq_hf.matrices import plan_of  # noqa: E402
from muonq_hf.state import QuantizedMomentum  # noqa: E402
from muonq_hf.weights import KAHAN  # noqa: E402


def fsdp(config: str, seed: int = 0) -> tuple[torch.nn.Module, MuonQ]:
    model = make_model(seed)
    fully_shard(model)
    return model, make_optimizer(model, config)


def same_on_all_ranks(t: torch.Tensor) -> bool:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return all(torch.equal(parts[0], x) for x in parts)




def count_collectives_of_a_step() -> dict:
    """torch.distributed calls made by ``optimizer.step()`` (the third) of a 12-layer, 256-wide GPT-2 under FSDP2,
    by name: each one a network latency across nodes."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from muonq_hf import param_groups

    torch.manual_seed(0)
    config = GPT2Config(n_embd=256, n_layer=12, n_head=4, vocab_size=1024, n_positions=32)
    model = GPT2LMHeadModel(config)
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    opt = MuonQ(param_groups(model), lr=0.01)
    for step in range(3):
        ids = torch.randint(0, 1024, (2, 16), generator=torch.Generator().manual_seed(step))
        model(input_ids=ids, labels=ids).loss.backward()
        with counted_collectives() as counts:
            opt.step()
        opt.zero_grad(set_to_none=True)
    muon = sum(len(g["params"]) for g in opt.param_groups if g["use_muon"])
    return {"total": sum(counts.values()), "by_name": counts, "muon_params": muon}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--ckpt1", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    res: dict = {"world": world}

    # ---------------------------------------------------------------- 3. equivalence with one process
    for config in ("muonq", "muon32"):
        ref_model = make_model()
        ref_opt = make_optimizer(ref_model, config)
        ref_losses = train(ref_model, ref_opt, range(STEPS))
        model, opt = fsdp(config)
        losses = train(model, opt, range(STEPS), rank, world)
        res[config] = {
            "ref_losses": ref_losses,
            "losses": losses,
            "weights_rel_diff": max_rel_diff(weights(model), weights(ref_model)),
            "momentum_rel_diff": max_rel_diff(momenta(opt), momenta(ref_opt)),
        }
        if config == "muonq":
            # 1. sharded state: layout, replication, memory
            layout_ok, replicated_ok, local_bytes = True, True, 0
            for group in opt.param_groups:
                for p in group["params"]:
                    for key, value in opt.state[p].items():
                        if isinstance(value, DTensor):
                            local_bytes += value.to_local().numel() * value.element_size()
                            layout_ok &= value.placements == p.placements and value.device_mesh == p.device_mesh
                            layout_ok &= value.shape[0] == p.shape[0]
                            layout_ok &= value.to_local().shape[0] == p.to_local().shape[0]
                        elif value.ndim:
                            replicated_ok &= same_on_all_ranks(value)
                            layout = QuantizedMomentum(plan_of(p, group), group)
                            layout_ok &= group["use_muon"] and not layout.is_row(key)
            res["state_layout_ok"], res["state_replicated_ok"] = bool(layout_ok), bool(replicated_ok)
            res["muon_bytes_rank"] = [0] * world
            sizes = torch.tensor([state_bytes(opt)["muon"]["total"]])
            gathered = [torch.zeros_like(sizes) for _ in range(world)]
            dist.all_gather(gathered, sizes)
            res["muon_bytes_rank"] = [int(x) for x in gathered]
            res["muon_bytes_single"] = state_bytes(ref_opt)["muon"]["total"]
            res["total_bytes_rank"] = state_bytes(opt)["total"]
            res["total_bytes_single"] = state_bytes(ref_opt)["total"]

    # Negative control: an owner that assembles a matrix from its own rows only (the others' rows zero) must land
    # far outside the tolerance the test uses, or the equivalence test could not fail.
    ref_model = make_model()
    ref_opt = make_optimizer(ref_model, "muonq")
    train(ref_model, ref_opt, range(STEPS))
    real = fsdp2_backend._assemble
    fsdp2_backend._assemble = lambda parts: torch.cat([parts[0], *map(torch.zeros_like, parts[1:])])
    try:
        model, opt = fsdp("muonq")
        train(model, opt, range(STEPS), rank, world)
    finally:
        fsdp2_backend._assemble = real
    res["broken_reducer_weights_rel_diff"] = max_rel_diff(weights(model), weights(ref_model))

    # ---------------------------------------------------------------- 4. checkpoints (2 -> 2, 1 -> 2, 2 -> 1)
    model, opt = fsdp("muonq")
    train(model, opt, range(HALF), rank, world)
    sharded_dir = os.path.join(args.out, "ckpt2_sharded")
    dcp.save(
        {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt, options=SHARDED)},
        checkpoint_id=sharded_dir,
    )
    full_osd = get_optimizer_state_dict(model, opt, options=FULL)
    full_msd = get_model_state_dict(model, options=FULL)
    if rank == 0:
        torch.save({"model": full_msd, "optim": full_osd}, os.path.join(args.out, "ckpt2_full.pt"))
    mid_momenta = momenta(opt)
    if rank == 0:
        torch.save(mid_momenta, os.path.join(args.out, "ckpt2_momenta.pt"))
    train(model, opt, range(HALF, STEPS), rank, world)
    final_w, final_s = weights(model), full_state(opt)
    dist.barrier()

    for kind in ("sharded", "full"):
        model, opt = fsdp("muonq", seed=1)  # different init: everything must come from the checkpoint
        if kind == "sharded":
            sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt, options=SHARDED)}
            dcp.load(sd, checkpoint_id=sharded_dir)
            set_model_state_dict(model, sd["model"])
            before = weights(model)
            set_optimizer_state_dict(model, opt, sd["optim"], options=SHARDED)
        else:
            saved = torch.load(os.path.join(args.out, "ckpt2_full.pt"), weights_only=True) if rank == 0 else {}
            set_model_state_dict(model, saved.get("model", {}), options=FULL)
            before = weights(model)
            set_optimizer_state_dict(model, opt, saved.get("optim", {}), options=FULL)
        res[f"fake_step_weight_difference_{kind}"] = first_difference({0: weights(model)}, {0: before})
        res[f"resume_momenta_difference_{kind}"] = first_difference({0: momenta(opt)}, {0: mid_momenta})
        train(model, opt, range(HALF, STEPS), rank, world)
        res[f"resume_2to2_weights_difference_{kind}"] = first_difference({0: weights(model)}, {0: final_w})
        res[f"resume_2to2_state_difference_{kind}"] = first_difference(full_state(opt), final_s)

    # 1 -> 2: the single-process checkpoint (plain tensors) resharded onto 2 ranks
    model, opt = fsdp("muonq", seed=1)
    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt, options=SHARDED)}
    dcp.load(sd, checkpoint_id=args.ckpt1)
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"], options=SHARDED)
    ref1 = torch.load(args.ckpt1 + "_momenta.pt", weights_only=True)
    res["resume_1to2_momenta_difference"] = first_difference({0: momenta(opt)}, {0: ref1})
    train(model, opt, range(HALF, STEPS), rank, world)
    ref_model = make_model()
    ref_opt = make_optimizer(ref_model, "muonq")
    train(ref_model, ref_opt, range(STEPS))
    res["resume_1to2_weights_rel_diff"] = max_rel_diff(weights(model), weights(ref_model))

    # ---------------------------------------------------------------- low-precision weights (bf16, no fp32 master)
    # The gradients are given (the same whole bf16 gradient in both runs, sharded here like the weight): a bf16
    # forward on half batches would differ from one process by bf16 rounding, and every rounding decision with it.
    def bf16(mode: str, init: int = 0, sharded: bool = True, **options) -> tuple[torch.nn.Module, MuonQ]:
        model = make_model(init).to(torch.bfloat16)
        if sharded:
            fully_shard(model)
        return model, make_optimizer(model, "muonq", weight_update=mode, **options)

    def given_steps(model: torch.nn.Module, opt: MuonQ, steps: range) -> None:
        for step in steps:
            for i, p in enumerate(model.parameters()):
                g = torch.Generator().manual_seed(100 * step + i)
                grad = torch.randn(p.shape, generator=g).to(torch.bfloat16)
                p.grad = distribute_tensor(grad, p.device_mesh, p.placements) if isinstance(p, DTensor) else grad
            opt.step()
            opt.zero_grad(set_to_none=True)

    def differing(a: dict, b: dict) -> float:  # the fraction of weight elements that differ
        return sum(int((a[k] != b[k]).sum()) for k in b) / sum(b[k].numel() for k in b)

    low: dict = {}
    for mode in ("stochastic", "kahan"):
        ref_model, ref_opt = bf16(mode, sharded=False)
        given_steps(ref_model, ref_opt, range(STEPS))
        model, opt = bf16(mode)
        given_steps(model, opt, range(STEPS))
        low[f"{mode}_difference"] = first_difference(weights(model), weights(ref_model))
        if mode == "stochastic":  # the control: other noise keys (seed=1) round this many elements otherwise
            other_model, other_opt = bf16(mode, sharded=False, seed=1)
            given_steps(other_model, other_opt, range(STEPS))
            low["other_noise_differing"] = differing(weights(other_model), weights(ref_model))
        else:  # the buffers are DTensors laid out like their weights, and a sharded checkpoint resumes exactly
            low["buffers_like_weights"] = all(
                opt.state[p][KAHAN].placements == p.placements and opt.state[p][KAHAN].shape == p.shape
                for group in opt.param_groups for p in group["params"]
            )
            model, opt = bf16(mode)
            given_steps(model, opt, range(HALF))
            kahan_dir = os.path.join(args.out, "ckpt_kahan")
            dcp.save(dcp_state(model, opt), checkpoint_id=kahan_dir)
            given_steps(model, opt, range(HALF, STEPS))
            resumed, opt2 = bf16(mode, init=1)
            sd = dcp_state(resumed, opt2)
            dcp.load(sd, checkpoint_id=kahan_dir)
            set_model_state_dict(resumed, sd["model"])
            set_optimizer_state_dict(resumed, opt2, sd["optim"], options=SHARDED)
            given_steps(resumed, opt2, range(HALF, STEPS))
            low["kahan_resume_difference"] = first_difference(weights(resumed), weights(model))
    res["low_precision"] = low

    # ---------------------------------------------------------------- refusals and non-finite agreement
    model, opt = fsdp("muonq")
    loss = model(torch.zeros(2, 3, dtype=torch.long))[1].sum()
    loss.backward()
    if rank == 1:
        model.fc1.weight.grad.to_local().fill_(float("nan"))
    try:
        opt.step()
        res["nonfinite_raised"] = False
    except FloatingPointError:
        res["nonfinite_raised"] = True
    flags = torch.tensor([int(res["nonfinite_raised"])])
    dist.all_reduce(flags)
    res["nonfinite_raised_all_ranks"] = int(flags) == world

    model, opt = fsdp("muonq")
    opt.cuda_graph = True  # a recorded step cannot exchange rows between ranks: refused before anything changes
    model(torch.zeros(2, 3, dtype=torch.long))[1].sum().backward()
    before = model.fc1.weight.to_local().clone()
    try:
        opt.step()
        res["graph_error"] = None
    except ValueError as e:
        res["graph_error"] = str(e)
    res["graph_refusal_changed_nothing"] = torch.equal(model.fc1.weight.to_local(), before)

    # collectives of one optimizer step on a 12-layer GPT-2 (48 Muon matrices), every torch.distributed call counted
    res["collectives_per_step"] = count_collectives_of_a_step()

    # a column-sharded matrix (tensor parallel's rowwise layout on a 1-D mesh): the same step as in one process
    mesh = model.fc1.weight.device_mesh
    gen = torch.Generator().manual_seed(7)
    weight, grad = torch.randn(8, 6, generator=gen), torch.randn(8, 6, generator=gen)
    tp = torch.nn.Parameter(distribute_tensor(weight, mesh, [Shard(1)]))
    one = torch.nn.Parameter(weight.clone())
    tp_opt, one_opt = (MuonQ([dict(params=[q], use_muon=True)], ns_dtype="fp32") for q in (tp, one))
    for _ in range(2):
        tp.grad, one.grad = distribute_tensor(grad, mesh, [Shard(1)]), grad.clone()
        tp_opt.step()
        one_opt.step()
    res["columns_weights_rel_diff"] = max_rel_diff({0: tp.full_tensor()}, {0: one.detach()})
    pending = torch.nn.Parameter(DTensor.from_local(torch.randn(8, 6), mesh, [Partial()]))
    pending.grad = DTensor.from_local(torch.randn(8, 6), mesh, [Partial()])
    try:
        MuonQ([dict(params=[pending], use_muon=True)]).step()
        res["partial_error"] = None
    except ValueError as e:
        res["partial_error"] = str(e)

    # layouts a step cannot take are refused before any parameter steps: a Muon matrix listed first keeps its weight
    refusals = {}
    for name, (placement, options) in {
        "adamw8_columns": (Shard(1), dict(use_muon=False, adamw_bits=8)),
        "stochastic_strided": (None, dict(use_muon=True, weight_update="stochastic")),
    }.items():
        first = torch.nn.Parameter(distribute_tensor(weight.to(torch.bfloat16), mesh, [Shard(0)]))
        if placement is None:  # a colwise tensor-parallel layout after FSDP: a strided shard of the rows
            from torch.distributed.tensor.placement_types import _StridedShard

            mesh2 = torch.distributed.device_mesh.init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "tp"))
            data = torch.randn(8, 6, generator=gen).to(torch.bfloat16)
            refused = torch.nn.Parameter(
                distribute_tensor(data, mesh2, [_StridedShard(0, split_factor=world), Shard(0)]))
        else:
            refused = torch.nn.Parameter(distribute_tensor(torch.randn(128, 64, generator=gen), mesh, [placement]))
        for q in (first, refused):
            q.grad = torch.zeros_like(q)
        opt = MuonQ([dict(params=[first], use_muon=True, weight_update=options.get("weight_update", "nearest")),
                     dict(params=[refused], **options)], lr=0.1)
        before = first.to_local().clone()
        try:
            opt.step()
            refusals[name] = None
        except ValueError as e:
            refusals[name] = str(e)
        refusals[f"{name}_changed_nothing"] = torch.equal(first.to_local(), before) and not opt.state
    res["layout_refusals"] = refusals

    write_results_and_finish(res, args.out, rank)


if __name__ == "__main__":
    main()
