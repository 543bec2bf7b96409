"""2-rank DeepSpeed ZeRO worker for tests/test_deepspeed.py (launched by torchrun, gloo on CPU).

For each ZeRO stage it trains a tiny GPT-2 (fused-QKV Conv1D, tied embeddings, norms, biases) with
DeepSpeedMuonQ and writes to $DS_OUT (rank 0: full fp32 weights via DeepSpeed's public safe_get_full_fp32_param,
per-rank counters and the packed state of each rank) what the test compares with a single-process MuonQ.
Scenarios (argv[1], comma separated):
  fp32   identical batches on both ranks: the reduced gradient equals the single-process one exactly.
  split  each rank gets half of the batch (bits=32): the reduction only reorders fp32 sums.
  bf16   bf16 model with fp32 master weights, identical batches.
  resume save at step K through engine.save_checkpoint, load into a fresh engine, continue to N.
  plain  a plain MuonQ handed to deepspeed.initialize: the first step must refuse, not train.
  moe    like fp32 on a tiny Qwen3-MoE (stacked experts (E, 2I, H) with gate/up halves, routers to AdamW).
  gqa    like fp32 on a tiny Phi-3 (fused grouped-query qkv_proj with pieces of unequal sizes, fused gate_up).
  reshape  another number of ranks (muonq_hf.deepspeed_checkpoint), identical batches: 2 ranks -> one process
         (consolidate at step K, a plain MuonQ continues to N) and one process -> 2 ranks (a one-process
         checkpoint at K loaded into a fresh engine); both against the uninterrupted runs.
  reshape8 the same with adamw_bits=8 (its straight run against single-process MuonQ, bit for bit).
"""

from __future__ import annotations

import copy
import json
import os
import sys
import tempfile

import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
import deepspeed  # noqa: E402
import deepspeed.ops  # noqa: E402

# The CPU backend JIT-builds a shared-memory all-reduce kernel with ninja (minutes on 2 cores). gloo does the
# same collectives; the kernel is a speed-up only. Tests skip it unless MUONQ_DS_SHM=1 (measured once).
if os.environ.get("MUONQ_DS_SHM") != "1":
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

from deepspeed.utils import safe_get_full_fp32_param  # noqa: E402
from launch import exit_after_results  # noqa: E402
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from muonq_hf import MuonQ, param_groups  # noqa: E402
from muonq_hf.checkpoint import CheckpointError  # noqa: E402
from muonq_hf.deepspeed import DeepSpeedMuonQ, initialize, verify_engine  # noqa: E402
from muonq_hf.deepspeed_checkpoint import consolidated_state, load_consolidated_state  # noqa: E402
from muonq_hf.matrices import plan_of  # noqa: E402
from muonq_hf.orthogonalize import muon_scale  # noqa: E402

STEPS, RESUME_AT, BATCH, SEQ, VOCAB = 4, 2, 4, 16, 96
OPTIONS = dict(lr=0.02, weight_decay=0.1, seed=3)


# the models of run_reshape: the GPT-2 below, and with 8-bit AdamW one whose embedding takes 8-bit moments
MODEL = {False: {}, True: {"vocab": 128}}  # 128 x 40 = 5120 >= 4096 elements


def make_model(dtype: torch.dtype = torch.float32, scenario: str = "fp32", vocab: int = VOCAB) -> torch.nn.Module:
    torch.manual_seed(0)
    if scenario == "moe":
        config = Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                                num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                num_experts=4, num_experts_per_tok=2, max_position_embeddings=SEQ)
        return Qwen3MoeForCausalLM(config).to(dtype)
    if scenario == "gqa":
        config = Phi3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                            pad_token_id=0, bos_token_id=1, eos_token_id=2)
        return Phi3ForCausalLM(config).to(dtype)
    config = GPT2Config(vocab_size=vocab, n_positions=SEQ, n_embd=40, n_layer=2, n_head=4, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).to(dtype)


def batch(step: int, micro: int, half: int | None) -> torch.Tensor:
    """The step's (micro-)batch; ``half`` picks this rank's rows of it (None: all rows, on every rank)."""
    g = torch.Generator().manual_seed(1000 * step + micro)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    return ids if half is None else ids.chunk(2)[half]


def ds_config(stage: int, bf16: bool, gas: int, micro: int) -> dict:
    config = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 2000, "allgather_bucket_size": 2000},
        "steps_per_print": 10**9,
        "gradient_clipping": 0.0,  # DeepSpeed defaults to 1.0; the single-process reference does not clip
    }
    if stage == 3:
        # small sub-groups: ZeRO-3 steps each param group in several flat partitions (the matrices of each are
        # stepped in its own call); the 2-layer GPT-2's Muon group (~29k elements) spans several. No persistent
        # parameters: every one is gathered for its forward and released after (p.data empty in between)
        config["zero_optimization"].update(sub_group_size=8000, stage3_param_persistence_threshold=0)
    if bf16:
        config["bf16"] = {"enabled": True}
    return config


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: safe_get_full_fp32_param(p).clone() for n, p in model.named_parameters()}


def train_ds(engine, start: int, stop: int, gas: int, half: int | None, dtype: torch.dtype) -> list[float]:
    losses = []
    for step in range(start, stop):
        for micro in range(gas):
            ids = batch(step, micro, half)
            loss = engine(input_ids=ids, labels=ids, use_cache=False).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
    return losses


def extra_options(scenario: str, stage: int) -> dict:
    """Options beyond OPTIONS. ``split``, and Phi-3 / Qwen3-MoE under ZeRO-3, run fp32 state and NS and are compared
    within fp32 rounding: ZeRO-3's backward of an nn.Linear differs from torch's by an ulp (measured: 4e-9 on
    weight gradients of ~1e-2, also with memory_efficient_linear off), which a 4-bit code can amplify; GPT-2's
    Conv1D gradients are bit-identical under every stage."""
    if scenario == "split" or (stage == 3 and scenario in ("moe", "gqa")):
        return dict(bits=32, ns_dtype="fp32")
    return {}


def reference_file(scenario: str, extra: dict) -> str:
    return f"{scenario}_reference{'_fp32state' if extra and scenario != 'split' else ''}.pt"


def reference(scenario: str, extra: dict) -> dict[str, torch.Tensor]:
    """Single-process MuonQ on the same data; for bf16, on fp32 master copies of a bf16 model (as ZeRO does)."""
    bf16 = scenario == "bf16"
    gas = 2 if scenario == "fp32" else 1
    model = make_model(torch.bfloat16 if bf16 else torch.float32, scenario)
    master = copy.deepcopy(model).float() if bf16 else model  # ZeRO's master: the bf16 weights, upcast
    opt = MuonQ(param_groups(master), **OPTIONS, **extra)
    for step in range(STEPS):
        for micro in range(gas):
            ids = batch(step, micro, None)
            (model(input_ids=ids, labels=ids, use_cache=False).loss / gas).backward()
        if bf16:
            for p, q in zip(master.parameters(), model.parameters(), strict=True):
                p.grad = q.grad.float()
        opt.step()
        model.zero_grad(set_to_none=True)
        master.zero_grad(set_to_none=True)
        if bf16:
            with torch.no_grad():
                for p, q in zip(master.parameters(), model.parameters(), strict=True):
                    q.copy_(p)
    return {n: p.detach().clone() for n, p in master.named_parameters()}


def update_singular_values(opt, before: dict, after: dict, model) -> dict[str, list[float]]:
    """Singular values (all pieces, descending) of each Muon matrix's first applied update
    U = (W0 (1 - lr wd) - W1) / (lr 0.2 sqrt(max(m, n)))."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for g, refs in zip(opt.param_groups, opt._lp_refs, strict=True):
        if not g["use_muon"]:
            continue
        for ref in refs:
            p = ref()
            name = names[id(p)]
            plan = plan_of(torch.empty(tuple(getattr(p, "ds_shape", p.shape)), device="meta"), g)  # ZeRO-3: ds_shape
            decayed = before[name] * (1 - g["lr"] * g["weight_decay"])
            U = plan.view(decayed - after[name]) / g["lr"]  # (E, m, n)
            sv = [torch.linalg.svdvals(plan.take(U, b).double()) / muon_scale(*plan.batch_shape(b))
                  for b in range(len(plan.batches))]
            out[name] = torch.cat([s.flatten() for s in sv]).sort(descending=True).values.tolist()
    return out


def packed_summary(opt: DeepSpeedMuonQ) -> dict:
    """Names, dtypes and shapes of every state tensor of this rank (what its checkpoint file holds)."""
    out = {}
    for g, state in enumerate(flat_states(opt)):
        for key, value in state.items():
            if torch.is_tensor(value):
                out[f"g{g}.{key}"] = [str(value.dtype), list(value.shape)]
    return out


def client_state(saved: dict) -> dict:
    """MuonQ's state dict inside a ZeRO optimizer-states file (ZeRO 1/2 and ZeRO-3 name it differently)."""
    zero = saved["optimizer_state_dict"]
    return zero["base_optimizer_state"] if "base_optimizer_state" in zero else zero["optimizer_state_dict"]


def flat_states(opt: DeepSpeedMuonQ) -> list[dict]:
    """The state of each flat partition, in step order (ZeRO-3 empties param_groups between steps)."""
    return list(opt.state.values())


def single_process(start_state: dict | None, start: int, stop: int, **extra) -> tuple[torch.nn.Module, MuonQ]:
    """Plain MuonQ on the fp32 model, steps [start, stop), from ``start_state`` ({"model", "optimizer"})."""
    model = make_model(**MODEL["adamw_bits" in extra])
    opt = MuonQ(param_groups(model), **OPTIONS, **extra)
    if start_state is not None:
        model.load_state_dict(start_state["model"])
        opt.load_state_dict(start_state["optimizer"])
    for step in range(start, stop):
        ids = batch(step, 0, None)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        opt.step()
        model.zero_grad(set_to_none=True)
    return model, opt


def run_reshape(stage: int, rank: int, extra: dict | None = None) -> dict:
    """2 ranks -> 1 process and 1 process -> 2 ranks through the consolidated (one-process) checkpoint; ``extra``:
    more options of every run (``reshape8``: 8-bit AdamW moments, on a GPT-2 whose embedding has >= 4096
    elements)."""
    extra = extra or {}
    result = {}
    model = make_model(**MODEL[bool(extra)])
    opt = DeepSpeedMuonQ(param_groups(model), **OPTIONS, **extra)
    engine, *_ = initialize(model, opt, ds_config(stage, False, 1, BATCH))
    train_ds(engine, 0, RESUME_AT, 1, None, torch.float32)
    full = consolidated_state(engine, model)  # collective; rank 0 gets it
    train_ds(engine, RESUME_AT, STEPS, 1, None, torch.float32)
    straight = full_weights(model)
    reference_run, _ = single_process(None, 0, STEPS, **extra)
    result["straight_max_diff"] = max((straight[n] - p).abs().max().item() for n, p in reference_run.named_parameters())
    if rank == 0:  # 2 -> 1: a plain MuonQ in this process continues from the consolidated checkpoint
        _, alone_opt = single_process(None, 0, RESUME_AT, **extra)  # what one process holds at step K
        result["consolidated_state_equal"] = state_equal(full["optimizer"]["state"], alone_opt.state_dict()["state"])
        result["consolidated_entries"] = sorted({k for s in full["optimizer"]["state"].values() for k in s})
        one, _ = single_process(full, RESUME_AT, STEPS, **extra)  # (its loader keeps some of full's tensors)
        result["two_to_one_max_diff"] = max((straight[n] - p).abs().max().item() for n, p in one.named_parameters())
    # 1 -> 2: a one-process checkpoint at step K (each rank computes it: same seed, same batches)
    alone, alone_opt = single_process(None, 0, RESUME_AT, **extra)
    start = {"model": alone.state_dict(), "optimizer": alone_opt.state_dict()}
    model2 = make_model(**MODEL[bool(extra)])
    opt2 = DeepSpeedMuonQ(param_groups(model2), **OPTIONS, **extra)
    engine2, *_ = initialize(model2, opt2, ds_config(stage, False, 1, BATCH))
    eight, eight_opt = single_process(None, 0, RESUME_AT, bits=8, **extra)  # other storage options: refused,
    other = {"model": eight.state_dict(), "optimizer": eight_opt.state_dict()}  # and nothing changes
    try:
        load_consolidated_state(engine2, model2, other)
        result["other_options_error"] = None
    except CheckpointError as exc:
        result["other_options_error"] = str(exc)
    result["untouched_after_refusal"] = not any(flat_states(opt2))
    load_consolidated_state(engine2, model2, start)
    train_ds(engine2, RESUME_AT, STEPS, 1, None, torch.float32)
    got = full_weights(model2)
    result["one_to_two_max_diff"] = max((got[n] - p).abs().max().item() for n, p in reference_run.named_parameters())
    result["owned_after_load"] = sorted(k.split(".")[0] for state in flat_states(opt2) for k in state
                                        if k.startswith("m") and k.endswith(".step"))
    return result


def state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k] for k in x)
        for x, y in ((a[i], b[i]) for i in a))


def run(scenario: str, stage: int, rank: int, out: dict, tmp: str) -> None:
    bf16 = scenario == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    gas = 2 if scenario == "fp32" else 1  # gradient accumulation: NS must run once per optimizer step
    half = rank if scenario == "split" else None
    extra = extra_options(scenario, stage)
    model = make_model(dtype, scenario)
    micro = BATCH // 2 if half is not None else BATCH
    key = f"{scenario}/stage{stage}"
    if scenario in ("reshape", "reshape8"):
        out[key] = run_reshape(stage, rank, {"adamw_bits": 8} if scenario == "reshape8" else None)
        return
    if scenario == "plain":
        opt = MuonQ(param_groups(model), **OPTIONS)
        config = {**ds_config(stage, False, 1, BATCH), "zero_allow_untested_optimizer": True}
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
        out[key] = {"error": None, "verify": None}
        try:
            verify_engine(engine)
        except Exception as exc:  # the test checks the type and the message
            out[key]["verify"] = f"{type(exc).__name__}: {exc}"
        try:
            train_ds(engine, 0, 1, 1, None, dtype)
        except Exception as exc:
            out[key]["error"] = f"{type(exc).__name__}: {exc}"
        return
    opt = DeepSpeedMuonQ(param_groups(model), **OPTIONS, **extra)
    engine, *_ = initialize(model, opt, ds_config(stage, bf16, gas, micro))
    assert engine.optimizer.optimizer is opt
    stop = RESUME_AT if scenario == "resume" else STEPS
    before = full_weights(model)
    losses = train_ds(engine, 0, 1, gas, half, dtype)
    first_update = update_singular_values(opt, before, full_weights(model), model)
    losses += train_ds(engine, 1, stop, gas, half, dtype)
    result = {"losses": losses, "ns_calls": opt.ns_calls, "packed": packed_summary(opt), "sv": first_update}
    if scenario == "resume":
        ckpt = os.path.join(tmp, f"ckpt{stage}")
        engine.save_checkpoint(ckpt, tag="k")
        files = sorted(os.listdir(os.path.join(ckpt, "k")))
        saved = torch.load(os.path.join(ckpt, "k", f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"),
                           weights_only=False)
        base = client_state(saved)["state"]
        result["saved"] = {
            f"{g}.{k}": str(v.dtype) for g, s in base.items() for k, v in s.items() if torch.is_tensor(v)
        }
        result["files"] = files
        train_ds(engine, RESUME_AT, STEPS, gas, half, dtype)
        straight = full_weights(model)
        model2 = make_model(dtype)
        opt2 = DeepSpeedMuonQ(param_groups(model2), **OPTIONS, **extra)
        engine2, *_ = initialize(model2, opt2, ds_config(stage, bf16, gas, micro))
        engine2.load_checkpoint(ckpt, tag="k")
        train_ds(engine2, RESUME_AT, STEPS, gas, half, dtype)
        resumed = full_weights(model2)
        result["resume_max_diff"] = max((straight[n] - resumed[n]).abs().max().item() for n in straight)
        other = client_state(torch.load(os.path.join(ckpt, "k", f"zero_pp_rank_{1 - rank}_mp_rank_00_optim_states.pt"),
                                        weights_only=False))
        if stage == 3:  # ZeRO-3 hands the client its flat partitions only while it loads (as load_checkpoint does)
            engine2.optimizer._set_fp32_optimizer_param_groups()
        try:  # the other rank's file holds the Muon states of matrices this rank does not own
            opt2.load_state_dict(other)
            result["foreign_owner_error"] = None
        except CheckpointError as exc:
            result["foreign_owner_error"] = str(exc)
        finally:
            if stage == 3:
                engine2.optimizer._clear_fp32_optimizer_param_groups()
        result["state_equal"] = all(
            torch.equal(a, b) if torch.is_tensor(a) else a == b
            for s1, s2 in zip(flat_states(opt), flat_states(opt2), strict=True)
            for (k1, a), (k2, b) in zip(sorted(s1.items()), sorted(s2.items()), strict=True)
        )
    weights = full_weights(model)
    if rank == 0:
        torch.save(weights, os.path.join(os.environ["DS_OUT"], f"{scenario}_stage{stage}.pt"))
    out[key] = result


def main() -> None:
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    out: dict = {}
    stages = [int(s) for s in os.environ.get("DS_STAGES", "1,2,3").split(",")]
    if rank == 0:
        torch.save(dict(make_model().named_parameters()), os.path.join(os.environ["DS_OUT"], "init.pt"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = [tmp]
        torch.distributed.broadcast_object_list(tmp, src=0)  # one checkpoint directory for both ranks
        for scenario in sys.argv[1].split(","):
            if rank == 0 and scenario in ("moe", "gqa"):
                init = {n: p.detach().clone() for n, p in make_model(scenario=scenario).named_parameters()}
                torch.save(init, os.path.join(os.environ["DS_OUT"], f"{scenario}_init.pt"))
            for stage in stages:
                path = os.path.join(os.environ["DS_OUT"], reference_file(scenario, extra_options(scenario, stage)))
                if rank == 0 and scenario in ("fp32", "split", "bf16", "moe", "gqa") and not os.path.exists(path):
                    torch.save(reference(scenario, extra_options(scenario, stage)), path)
                run(scenario, stage, rank, out, tmp[0])
        torch.distributed.barrier()
    with open(os.path.join(os.environ["DS_OUT"], f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    exit_after_results()


if __name__ == "__main__":
    main()
