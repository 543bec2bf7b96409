"""Per-rank MuonQ optimizer-state bytes under FSDP2 for 1, 2 and 4 ranks, and the optimizer-step time of sharded
(FSDP2) vs replicated (every rank holds and updates everything, as under DDP) MuonQ at 2 ranks. CPU, gloo.

    python benchmarks/fsdp_memory.py                      # spawns the worlds itself
    python benchmarks/fsdp_memory.py --memory-shape gpt2-small --speed-shape gpt2-small-2l --worlds 1 2 4

Memory: GPT-2-small-shaped model (built from its config), one optimizer step on random gradients; the state
shapes do not depend on the Newton-Schulz steps, so that run uses ns_steps=1 to save CPU time. Rows: FSDP2
(row-sharded codes and P, replicated R and scales) and, for comparison, DDP with ``ddp_shard_state=True``
(whole tensors per rank). Speed: optimizer.step() only (no forward/backward), ns_steps=5, median of timed
steps after one warm-up, on ``--speed-shape`` (default: 2 layers of GPT-2-small shape; CPU NS on all 12
layers takes minutes per step). The ratio includes the all-to-alls of the owners' exchange.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.models import build_model  # noqa: E402
from muonq_hf import MuonQ, param_groups, state_bytes  # noqa: E402


def _random_grads(model: torch.nn.Module, seed: int) -> None:
    torch.manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn_like(p)


def _shard(model: torch.nn.Module) -> None:
    from torch.distributed.fsdp import fully_shard

    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)


def _timed_steps(opt: MuonQ, model: torch.nn.Module, steps: int) -> float:
    times = []
    for i in range(steps + 1):
        _random_grads(model, seed=i)
        dist.barrier()
        t0 = time.perf_counter()
        opt.step()
        dist.barrier()
        if i:  # the first step allocates the state
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, args.threads // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    res: dict = {}
    # memory: FSDP2 row-sharded state
    model = build_model(args.memory_shape)
    _shard(model)
    opt = MuonQ(param_groups(model), lr=0.0, ns_steps=1, adamw_bits=args.adamw_bits)
    _random_grads(model, seed=0)
    opt.step()
    res["fsdp2"] = state_bytes(opt)
    del model, opt
    if world > 1:  # memory: DDP whole-tensor sharding
        model = build_model(args.memory_shape)
        opt = MuonQ(param_groups(model), lr=0.0, ns_steps=1, adamw_bits=args.adamw_bits, ddp_shard_state=True)
        _random_grads(model, seed=0)
        opt.step()
        res["ddp_shard_state"] = state_bytes(opt)
        del model, opt
    if world == 2:  # speed: sharded vs replicated step
        model = build_model(args.speed_shape)
        _shard(model)
        res["step_s_sharded"] = _timed_steps(MuonQ(param_groups(model), lr=1e-3), model, args.steps)
        model = build_model(args.speed_shape)
        opt = MuonQ(param_groups(model), lr=1e-3)
        res["step_s_replicated"] = _timed_steps(opt, model, args.steps)  # plain params: single-process path
    with open(os.path.join(out, f"{world}_{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.barrier()
    dist.destroy_process_group()


def _mib(b: int) -> str:
    return f"{b / 2**20:8.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--memory-shape", default="gpt2-small")
    ap.add_argument("--speed-shape", default="gpt2-small-2l")
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--adamw-bits", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads shared by the ranks")
    args = ap.parse_args()
    results: dict[int, list[dict]] = {}
    with tempfile.TemporaryDirectory() as out:
        for world in args.worlds:
            from socket import socket

            with socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            mp.spawn(_worker, args=(world, port, args, out), nprocs=world, join=True)
            results[world] = []
            for r in range(world):
                with open(os.path.join(out, f"{world}_{r}.json")) as f:
                    results[world].append(json.load(f))

    print(f"Per-rank optimizer state (MiB), {args.memory_shape}, adamw_bits={args.adamw_bits}")
    print(f"{'layout':<18}{'ranks':>6}{'rank':>6}{'muon':>10}{'adamw':>10}{'total':>10}")
    for world, ranks in results.items():
        for kind in ("fsdp2", "ddp_shard_state"):
            for r, res in enumerate(ranks):
                if kind in res:
                    b = res[kind]
                    print(f"{kind:<18}{world:>6}{r:>6}{_mib(b['muon']['total'])}  {_mib(b['adamw']['total'])}  "
                          f"{_mib(b['total'])}")
    if 2 in results and "step_s_sharded" in results[2][0]:
        sharded = max(r["step_s_sharded"] for r in results[2])
        replicated = max(r["step_s_replicated"] for r in results[2])
        print(f"\noptimizer.step() at 2 ranks, {args.speed_shape}: sharded (FSDP2) {sharded:.3f} s, "
              f"replicated {replicated:.3f} s, ratio sharded/replicated {sharded / replicated:.2f}")
    print(json.dumps({str(k): v for k, v in results.items()}))


if __name__ == "__main__":
    main()
