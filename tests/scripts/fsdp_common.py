"""Shared by the FSDP2/DDP worker scripts and their pytest drivers: a toy model with every layout MuonQ meets
(uneven rows 2k+1, a 1-row matrix that leaves a rank an empty shard, fused QKV pieces on both split dims,
grouped-query QKV pieces of unequal sizes, stacked experts with interleaved gate/up halves (3 experts: uneven
expert shards) and a single expert (a rank holds none), an embedding big enough for 8-bit AdamW, norms and
biases), its param groups, data and helpers."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from launch import exit_after_results, run_two_ranks
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions

from muonq_hf.matrices import plan_of
from muonq_hf.optimizer import MuonQ
from muonq_hf.state import QuantizedMomentum

# the two ways Accelerate saves a distributed state: FULL_STATE_DICT, and SHARDED_STATE_DICT (DCP)
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True, broadcast_from_rank0=True)
SHARDED = StateDictOptions(full_state_dict=False)

D, VOCAB, BATCH, SEQ = 32, 129, 8, 6  # VOCAB * D = 4128 >= 4096: the embedding takes the 8-bit AdamW path
E, F, KV = 3, 16, 8  # experts, expert width, key/value rows of the grouped-query QKV
CONFIGS = {
    "muonq": dict(adamw_bits=8),  # MuonQ defaults (4-bit, mu-law, low-rank split, normalization)
    "muon32": dict(bits=32, normalize=False, rank_divisor=0, mu=0.0),  # plain fp32 Muon (docs/design.md, "Plain Muon")
}
LR, WD = 0.02, 0.1
STEPS, HALF = 6, 3  # a resume test trains HALF steps, checkpoints, then continues to STEPS


class Toy(nn.Module):
    """Embedding -> fused QKV (Conv1D-style (d, 3d) and Linear (3d, d)) -> LayerNorm -> MLP -> 1-output head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.qkv_conv = nn.Parameter(torch.randn(D, 3 * D) / math.sqrt(D))  # (in, out): split_dim=1
        self.qkv_lin = nn.Linear(D, 3 * D, bias=False)  # weight (3d, d): split_dim=0, pieces cut by shards
        self.ln = nn.LayerNorm(D)
        self.fc1 = nn.Linear(D, 2 * D + 1)  # weight (65, 32): rows = 2k + 1, uneven shards
        self.fc2 = nn.Linear(2 * D + 1, D)  # weight (32, 65): even shards
        self.head = nn.Linear(D, 1)  # weight (1, 32): rank 1 of 2 holds no row
        self.qkv_gqa = nn.Linear(D, D + 2 * KV, bias=False)  # weight (48, 32): pieces [32, 8, 8], cut by shards
        self.gate_up = nn.Parameter(torch.randn(E, D, 2 * F) / math.sqrt(D))  # (E, in, out), gate = [..., ::2]
        self.down = nn.Parameter(torch.randn(E, F, D) / math.sqrt(F))  # (E, in, out)
        self.solo = nn.Parameter(torch.randn(1, D, D) / math.sqrt(D))  # one expert: a rank of 2 holds none

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens)  # (B, T, d)
        a = torch.tanh(x @ self.qkv_conv).unflatten(-1, (3, D)).sum(-2)
        b = torch.tanh(self.qkv_lin(x)).unflatten(-1, (3, D)).sum(-2)
        q, k, v = torch.tanh(self.qkv_gqa(x)).split([D, KV, KV], dim=-1)
        c = q + (k * v).repeat(1, 1, D // KV)
        gu = torch.einsum("btd,edf->ebtf", x, self.gate_up)  # (E, B, T, 2F)
        experts = torch.einsum("ebtf,efd->btd", torch.nn.functional.silu(gu[..., ::2]) * gu[..., 1::2], self.down)
        h = self.ln(x + a + b + c + experts / E + torch.tanh(x @ self.solo[0]))
        h = h + self.fc2(torch.nn.functional.gelu(self.fc1(h)))
        return h @ self.emb.weight.T, self.head(h).squeeze(-1).mean(-1)  # tied logits (B, T, V), scalar (B,)


def make_model(seed: int = 0) -> Toy:
    torch.manual_seed(seed)
    return Toy()


def groups(model: Toy, **options) -> list[dict]:
    muon = [model.fc1.weight, model.fc2.weight, model.head.weight]
    no_decay = [model.ln.weight, model.ln.bias, model.fc1.bias, model.fc2.bias, model.head.bias]
    return [
        dict(params=muon, use_muon=True, weight_decay=WD, **options),
        dict(params=[model.qkv_conv], use_muon=True, weight_decay=WD, qkv_split=3, split_dim=1, **options),
        dict(params=[model.qkv_lin.weight], use_muon=True, weight_decay=WD, qkv_split=3, split_dim=0, **options),
        dict(params=[model.qkv_gqa.weight], use_muon=True, weight_decay=WD, piece_sizes=[D, KV, KV], **options),
        dict(params=[model.gate_up], use_muon=True, weight_decay=WD, experts=True, qkv_split=2, split_dim=1,
             interleave=True, **options),
        dict(params=[model.down, model.solo], use_muon=True, weight_decay=WD, experts=True, **options),
        dict(params=[model.emb.weight], use_muon=False, weight_decay=WD, **options),
        dict(params=no_decay, use_muon=False, weight_decay=0.0, **options),
    ]


def make_optimizer(model: Toy, config: str, **kwargs) -> MuonQ:
    # NS in fp32: ranks and one process differ by fp32 reduction-order noise (~1e-7), which the 1e-5 parity
    # tolerance allows; bf16 NS would turn it into bf16 rounding flips (~4e-3)
    return MuonQ(groups(model, **CONFIGS[config]), lr=LR, ns_dtype="fp32", **kwargs)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=g), torch.randn(BATCH, generator=g)


def train(model: nn.Module, opt: MuonQ, steps: range, rank: int = 0, world: int = 1) -> list[float]:
    """Each rank takes its slice of the global batch; returns the global (rank-averaged) loss per step."""
    losses = []
    for step in steps:
        tokens, target = batch(step)
        part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        logits, value = model(tokens[part])
        # next-token cross-entropy keeps every gradient full-rank (a lone 1-output head would make fc2's
        # gradient rank 1, where the low-rank split is chaotic in any run); the MSE term trains the head
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[part, 1:].flatten())
        loss = loss + torch.nn.functional.mse_loss(value, target[part])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = loss.detach().clone()
        if world > 1:
            torch.distributed.all_reduce(value)
            value /= world
        losses.append(float(value))
    return losses


COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_to_all", "all_to_all_single", "broadcast",
               "gather", "scatter", "reduce", "reduce_scatter", "reduce_scatter_tensor", "barrier")


@contextmanager
def counted_collectives() -> Iterator[dict[str, int]]:
    """The torch.distributed calls (``COLLECTIVES``) made inside the block, counted by name: each one a network
    latency across nodes."""
    counts: dict[str, int] = {}
    real = {name: getattr(dist, name) for name in COLLECTIVES}

    def counting(name: str, fn):  # noqa: ANN001, ANN202
        def call(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            counts[name] = counts.get(name, 0) + 1
            return fn(*args, **kwargs)

        return call

    for name, fn in real.items():
        setattr(dist, name, counting(name, fn))
    try:
        yield counts
    finally:
        for name, fn in real.items():
            setattr(dist, name, fn)


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def momenta(opt: MuonQ) -> dict[int, torch.Tensor]:
    """Dequantized momentum (E, m, n) of every Muon parameter, assembled from (possibly sharded) state."""
    out, index = {}, 0
    for group in opt.param_groups:
        for p in group["params"]:
            state = {k: full(v) for k, v in opt.state.get(p, {}).items()}
            if group["use_muon"] and state:
                out[index] = QuantizedMomentum(plan_of(p, group), group).dequantized(state)
            index += 1
    return out


def full_state(opt: MuonQ) -> dict[int, dict[str, torch.Tensor]]:
    """Every state tensor, full (DTensors gathered), keyed by parameter index."""
    params = [p for g in opt.param_groups for p in g["params"]]
    return {i: {k: full(v).clone() for k, v in opt.state.get(p, {}).items()} for i, p in enumerate(params)}


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: full(p.detach()).clone() for name, p in model.named_parameters()}


def first_difference(a, b, where: str = "") -> str | None:
    """None when a and b (nested dicts of tensors) are equal bit for bit, else where and by how much they differ:
    the worker reports it, so a failing test names the entry instead of a bare False."""
    if isinstance(a, dict):
        if a.keys() != b.keys():
            left, right = sorted(map(str, a.keys() - b.keys())), sorted(map(str, b.keys() - a.keys()))
            return f"{where or 'top'}: keys differ (only left {left}, only right {right})"
        return next((d for k in a if (d := first_difference(a[k], b[k], f"{where}[{k!r}]")) is not None), None)
    if not torch.is_tensor(a):
        return None if a == b else f"{where}: {a!r} vs {b!r}"
    if a.shape != b.shape or a.dtype != b.dtype:
        return f"{where}: {a.dtype} {tuple(a.shape)} vs {b.dtype} {tuple(b.shape)}"
    if torch.equal(a, b):
        return None
    diff = (a.double() - b.double()).abs()
    return f"{where}: {int((diff > 0).sum())} of {diff.numel()} elements differ, max |diff| {diff.max().item():.3g}"


def max_rel_diff(a: dict, b: dict) -> float:
    """max over tensors of ||a - b||_max / (||b||_max + 1e-12)."""
    return max(float((a[k].float() - b[k].float()).abs().max() / (b[k].float().abs().max() + 1e-12)) for k in b)


def dcp_state(model: nn.Module, opt: MuonQ, full: bool = False) -> dict:
    """The model and optimizer state dicts as Accelerate saves them through torch.distributed.checkpoint."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=full)
    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt, options=options)}


def save_one_process_checkpoint(ckpt: str) -> None:
    """The 1-process half of "save on 1, resume on 2": HALF steps of MuonQ, a DCP checkpoint at ``ckpt`` and the
    dequantized momenta beside it (``ckpt + "_momenta.pt"``) for the 2-rank worker to compare against."""
    import torch.distributed.checkpoint as dcp

    model = make_model()
    opt = make_optimizer(model, "muonq")
    train(model, opt, range(HALF))
    dcp.save(dcp_state(model, opt), checkpoint_id=ckpt)  # single process: plain tensors
    torch.save(momenta(opt), ckpt + "_momenta.pt")


def checkpoint_and_run_world(script: str, out: str) -> dict:
    """Save the 1-process checkpoint under ``out/ckpt1``, run the 2-rank ``script`` on it, return its results."""
    ckpt1 = os.path.join(out, "ckpt1")
    save_one_process_checkpoint(ckpt1)
    run_two_ranks(script, "--out", out, "--ckpt1", ckpt1)
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def write_results_and_finish(res: dict, out: str, rank: int) -> None:
    """Rank 0 writes ``out/results.json`` for the pytest driver; then every rank ends (``exit_after_results``)."""
    if rank == 0:
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(res, f, indent=1)
    exit_after_results()
