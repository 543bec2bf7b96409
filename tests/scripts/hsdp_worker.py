"""HSDP worker (torchrun --nproc_per_node 4): FSDP2 on a 2 x 2 mesh, (Replicate(), Shard(0)) placements, against
one process, and DCP checkpoints moved between the 2 x 2 mesh, a 1-D mesh of 4 and one process. Every check of
tests/test_hsdp.py, in one world. Rank 0 writes results.json into --out.

Usage: torchrun --nproc_per_node 4 tests/scripts/hsdp_worker.py --out DIR
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from fsdp_common import (
    CONFIGS,
    HALF,
    LR,
    SHARDED,
    STEPS,
    first_difference,
    groups,
    make_model,
    make_optimizer,
    max_rel_diff,
    momenta,
    train,
    weights,
    write_results_and_finish,
)
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from muonq_hf import MuonQ, state_bytes


class TPToy(nn.Module):
    """Embedding -> fused QKV (colwise: its rows cut by tensor parallel) -> LayerNorm -> MLP (colwise up, rowwise
    down) -> tied logits; even sizes, as tensor-parallel layers need."""

    def __init__(self, d: int = 32, f: int = 64, vocab: int = 128) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.d = d
        self.emb = nn.Embedding(vocab, d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.ln = nn.LayerNorm(d)
        self.up = nn.Linear(d, f)
        self.down = nn.Linear(f, d)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens)  # (B, T, d)
        h = self.ln(x + torch.tanh(self.qkv(x)).unflatten(-1, (3, self.d)).sum(-2))
        h = h + self.down(torch.nn.functional.gelu(self.up(h)))
        return h @ self.emb.weight.T  # (B, T, vocab)


def tp_groups(model: TPToy, **options) -> list[dict]:
    return [
        dict(params=[model.up.weight, model.down.weight], use_muon=True, weight_decay=0.1, **options),
        dict(params=[model.qkv.weight], use_muon=True, weight_decay=0.1, qkv_split=3, **options),
        dict(params=[model.emb.weight, model.ln.weight, model.ln.bias, model.up.bias, model.down.bias],
             use_muon=False, **options),
    ]


def train_tp(model: nn.Module, opt: MuonQ, dp_rank: int, dp_size: int, steps: int = STEPS) -> list[float]:
    """Each data-parallel rank takes its slice of the batch (the tensor-parallel ranks of one share it)."""
    losses = []
    for step in range(steps):
        tokens = torch.randint(0, 128, (8, 6), generator=torch.Generator().manual_seed(2000 + step))
        part = tokens[dp_rank * 8 // dp_size : (dp_rank + 1) * 8 // dp_size]
        logits = model(part)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), part[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = loss.detach().clone()
        if dist.is_initialized() and dp_size > 1:
            dist.all_reduce(value)
            value /= dist.get_world_size()
        losses.append(float(value))
    return losses


def sharded(config: str, shape: tuple[int, ...], seed: int = 0) -> tuple[torch.nn.Module, MuonQ]:
    """The toy model under fully_shard on a mesh of ``shape``: (2, 2) is HSDP (replicate x shard), (4,) FSDP2."""
    names = ("replicate", "shard") if len(shape) == 2 else ("shard",)
    model = make_model(seed)
    fully_shard(model, mesh=init_device_mesh("cpu", shape, mesh_dim_names=names))
    return model, make_optimizer(model, config)


def local_state(opt: MuonQ) -> torch.Tensor:
    """Every state tensor of this rank (DTensors: their local rows), flattened into one float64 vector."""
    parts = [(v.to_local() if isinstance(v, DTensor) else v).double().flatten()
             for p in (p for g in opt.param_groups for p in g["params"]) for v in opt.state[p].values()]
    return torch.cat(parts)


def gathered(t: torch.Tensor) -> list[torch.Tensor]:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return parts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    res: dict = {"world": world}

    # ------------------------------------------------- 1. HSDP 2 x 2 against one process, state per rank
    for config in ("muon32", "muonq"):
        ref_model = make_model()
        ref_opt = make_optimizer(ref_model, config)
        ref_losses = train(ref_model, ref_opt, range(STEPS))
        model, opt = sharded(config, (2, 2))
        res.setdefault("placements", str(tuple(next(model.parameters()).placements)))
        losses = train(model, opt, range(STEPS), rank, world)
        res[config] = {
            "ref_losses": ref_losses, "losses": losses,
            "weights_rel_diff": max_rel_diff(weights(model), weights(ref_model)),
            "momentum_rel_diff": max_rel_diff(momenta(opt), momenta(ref_opt)),
            "muon_bytes_rank": [int(x) for x in gathered(torch.tensor([state_bytes(opt)["muon"]["total"]]))],
            "muon_bytes_single": state_bytes(ref_opt)["muon"]["total"],
        }
        # ranks r and r + 2 hold the same rows (one shard coordinate, two replicas): the same state, bit for bit
        mine = local_state(opt)  # shard coordinates hold different numbers of rows: padded to one length
        longest = max(int(n) for n in gathered(torch.tensor([mine.numel()])))
        states = gathered(torch.cat([mine, mine.new_full((longest - mine.numel(),), float("nan"))]))
        states = [s[~s.isnan()] for s in states]
        res[config]["replicas_equal"] = bool(torch.equal(states[0], states[2]) and torch.equal(states[1], states[3]))
        res[config]["shards_differ"] = not torch.equal(states[0], states[1])

    # the defaults as users run them (bf16 Newton-Schulz): bf16 rounding flips make the runs drift apart a little
    ref_model = make_model()
    ref_losses = train(ref_model, MuonQ(groups(ref_model, **CONFIGS["muonq"]), lr=LR), range(STEPS))
    model = make_model()
    fully_shard(model, mesh=init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard")))
    losses = train(model, MuonQ(groups(model, **CONFIGS["muonq"]), lr=LR), range(STEPS), rank, world)
    res["bf16_ns"] = {"ref_losses": ref_losses, "losses": losses}

    # ------------------------------------------------- 2. DCP: 2 x 2 -> 4 ranks -> one process
    model, opt = sharded("muonq", (2, 2))
    train(model, opt, range(HALF), rank, world)
    saved = os.path.join(args.out, "ckpt_2x2")
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt, options=SHARDED)},
             checkpoint_id=saved)
    at_save = momenta(opt)
    train(model, opt, range(HALF, STEPS), rank, world)
    final = weights(model)

    model4, opt4 = sharded("muonq", (4,), seed=1)  # another init: everything comes from the checkpoint
    sd = {"model": get_model_state_dict(model4), "optim": get_optimizer_state_dict(model4, opt4, options=SHARDED)}
    dcp.load(sd, checkpoint_id=saved)
    set_model_state_dict(model4, sd["model"])
    set_optimizer_state_dict(model4, opt4, sd["optim"], options=SHARDED)
    res["placements_4"] = str(tuple(next(model4.parameters()).placements))
    res["resume_2x2_to_4_momenta_difference"] = first_difference({0: momenta(opt4)}, {0: at_save})
    train(model4, opt4, range(HALF, STEPS), rank, world)
    res["resume_2x2_to_4_weights_rel_diff"] = max_rel_diff(weights(model4), final)
    saved4 = os.path.join(args.out, "ckpt_4")
    dcp.save({"model": get_model_state_dict(model4),
              "optim": get_optimizer_state_dict(model4, opt4, options=SHARDED)}, checkpoint_id=saved4)
    at_save4 = momenta(opt4)

    one = make_model(seed=1)  # one process (on every rank alike): plain tensors read whole from the checkpoint
    one_opt = make_optimizer(one, "muonq")
    train(one, one_opt, range(1))  # the state's entries exist, to be overwritten
    sd = {"model": get_model_state_dict(one), "optim": get_optimizer_state_dict(one, one_opt)}
    dcp.load(sd, checkpoint_id=saved4)
    set_model_state_dict(one, sd["model"])
    set_optimizer_state_dict(one, one_opt, sd["optim"])
    res["resume_4_to_1_momenta_difference"] = first_difference({0: momenta(one_opt)}, {0: at_save4})

    # ------------------------------------------------- 3. a non-finite gradient on one rank stops all four
    model, opt = sharded("muonq", (2, 2))
    model(torch.zeros(2, 3, dtype=torch.long))[1].sum().backward()
    if rank == 3:
        model.fc1.weight.grad.to_local().fill_(float("nan"))
    try:
        opt.step()
        raised = 0
    except FloatingPointError:
        raised = 1
    flags = torch.tensor([raised])
    dist.all_reduce(flags)
    res["nonfinite_raised_ranks"] = int(flags)

    # ------------------------------------------------- 4. dp 2 x tp 2: tensor parallel, then fully_shard on dp
    for config in ("muon32", "muonq", "muonq_bf16"):  # muonq_bf16: the defaults as users run them (bf16 NS)
        ns = {} if config == "muonq_bf16" else {"ns_dtype": "fp32"}
        options = CONFIGS[config.removesuffix("_bf16")]
        ref = TPToy()
        ref_opt = MuonQ(tp_groups(ref, **options), lr=LR, **ns)
        ref_losses = train_tp(ref, ref_opt, 0, 1)
        model = TPToy()
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        parallelize_module(model, mesh["tp"], {
            "qkv": ColwiseParallel(output_layouts=Replicate()),  # a fused QKV cut by tensor parallel
            "up": ColwiseParallel(), "down": RowwiseParallel(),
        })
        fully_shard(model, mesh=mesh["dp"])
        opt = MuonQ(tp_groups(model, **options), lr=LR, **ns)
        losses = train_tp(model, opt, mesh["dp"].get_local_rank(), 2)
        res[f"tp_{config}"] = {
            "ref_losses": ref_losses, "losses": losses,
            "placements": {n: str(tuple(p.placements)) for n, p in model.named_parameters()},
            "weights_rel_diff": max_rel_diff(weights(model), weights(ref)),
            "momentum_rel_diff": max_rel_diff(momenta(opt), momenta(ref_opt)),
            "muon_bytes_rank": [int(x) for x in gathered(torch.tensor([state_bytes(opt)["muon"]["total"]]))],
            "muon_bytes_single": state_bytes(ref_opt)["muon"]["total"],
        }
        if config == "muonq":  # a DCP checkpoint of the dp x tp run loads in one process with the same momenta
            saved_tp = os.path.join(args.out, "ckpt_tp")
            dcp.save({"optim": get_optimizer_state_dict(model, opt, options=SHARDED)}, checkpoint_id=saved_tp)
            one = TPToy()
            one_opt = MuonQ(tp_groups(one, **options), lr=LR, **ns)
            train_tp(one, one_opt, 0, 1, steps=1)
            sd = {"optim": get_optimizer_state_dict(one, one_opt)}
            dcp.load(sd, checkpoint_id=saved_tp)
            set_optimizer_state_dict(one, one_opt, sd["optim"])
            res["tp_to_1_momenta_difference"] = first_difference({0: momenta(one_opt)}, {0: momenta(opt)})

    write_results_and_finish(res, args.out, rank)


if __name__ == "__main__":
    main()
