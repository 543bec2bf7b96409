"""2-rank DDP worker for tests/test_batching.py: MuonQ with ddp_shard_state and batches forced on (each rank
steps the batches of the matrices it owns) against replicated MuonQ stepping one matrix at a time. Rank 0
writes $BATCH_OUT/ddp_batch.json: the first weight or state entry that differs (None: bit for bit) and the
batches each rank ran."""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist
from launch import exit_after_results
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers import GPT2Config, GPT2LMHeadModel

from muonq_hf import MuonQ, param_groups
from muonq_hf.backends.common import muon_groups

STEPS = 3


def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=4, n_head=4,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def train(model: DDP, opt: MuonQ, rank: int) -> None:
    for step in range(STEPS):
        ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(step)).chunk(2)[rank]
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    runs = {}
    for name, kwargs in (("sharded_batched", dict(ddp_shard_state=True, batch_elements=1 << 23)),
                         ("replicated", dict(batch_elements=0))):
        model = DDP(gpt2())
        opt = MuonQ(param_groups(model.module), lr=0.02, weight_decay=0.1, **kwargs)
        train(model, opt, rank)
        runs[name] = (model.module, opt)
    (batched, opt_b), (plain, opt_p) = runs["sharded_batched"], runs["replicated"]
    difference = None
    for (n, p), q in zip(batched.named_parameters(), plain.parameters(), strict=True):
        if difference is None and not torch.equal(p, q):
            difference = f"{n}: max diff {(p - q).abs().max().item():.3g}"
    full_b = opt_b.state_dict()  # collective under ddp_shard_state: the full state on every rank
    full_p = opt_p.state_dict()
    for i, state in full_p["state"].items():
        for key, value in state.items():
            if difference is None and torch.is_tensor(value) and not torch.equal(value, full_b["state"][i][key]):
                difference = f"state {i} {key}"
    backend = opt_b._backend()
    mine = [t for t, o in zip(opt_b._tasks(), backend.owners(opt_b._tasks()), strict=True) if o == rank]
    for t in mine:
        t.param.grad = torch.zeros_like(t.param)
    sizes = [len(b) for b in muon_groups(mine, opt_b.state, 1 << 23)]
    gathered: list = [None, None]
    dist.all_gather_object(gathered, sizes)
    if rank == 0:
        with open(os.path.join(os.environ["BATCH_OUT"], "ddp_batch.json"), "w") as f:
            json.dump({"difference": difference, "batch_sizes": gathered}, f)
    exit_after_results()


if __name__ == "__main__":
    main()
