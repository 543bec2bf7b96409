"""2-rank HF Trainer + DeepSpeed ZeRO worker (torchrun or accelerate launch, gloo on CPU) for tests/test_deepspeed.py.

For each DeepSpeed config in argv (examples/deepspeed/*.json): ``--optim muonq --deepspeed <config> --bf16``
trains a tiny GPT-2 for 4 steps (2 micro-batches each) saving at step 2, then resumes a fresh Trainer from
checkpoint-2. Writes $DS_OUT/trainer_stage{s}_rank{r}.json: the optimizer classes along the chain, the
distributed type, NS calls, and whether the resumed weights equal the uninterrupted ones.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

import muonq_hf  # noqa: E402, F401, I001  (registers --optim muonq before transformers is imported)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import accelerate_ds_fixture  # noqa: E402

accelerate_ds_fixture.install()

import deepspeed.ops  # noqa: E402

if os.environ.get("MUONQ_DS_SHM") != "1":  # see ds_engine_worker.py: gloo instead of the JIT-built kernel
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

from deepspeed.utils import safe_get_full_fp32_param  # noqa: E402
from launch import exit_after_results  # noqa: E402
from tiny_hf import trainer_worker_data, trainer_worker_model  # noqa: E402
from transformers import GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402


def trainer(out: str, config: str, max_steps: int, pretrained: str | None = None) -> Trainer:
    """``pretrained``: load the model with from_pretrained after the TrainingArguments exist, which under a ZeRO-3
    config builds it inside deepspeed.zero.Init (each parameter partitioned as it is created)."""
    via_accelerate = "ACCELERATE_DEEPSPEED_CONFIG_FILE" in os.environ  # set by `accelerate launch` only
    args = TrainingArguments(  # under `accelerate launch` the DeepSpeed config comes from its yaml, not --deepspeed
        output_dir=out, optim="muonq", deepspeed=None if via_accelerate else config, bf16=True, max_steps=max_steps,
        learning_rate=0.02,
        per_device_train_batch_size=2, gradient_accumulation_steps=2, save_steps=2, save_strategy="steps",
        logging_steps=1, report_to="none", seed=0, data_seed=0, lr_scheduler_type="constant",
        dataloader_num_workers=0, save_only_model=False,
    )
    model = GPT2LMHeadModel.from_pretrained(pretrained) if pretrained else trainer_worker_model()
    return Trainer(model=model, args=args, train_dataset=trainer_worker_data())


def saved_model(out: str) -> str:
    """``trainer_worker_model`` saved for from_pretrained. save_pretrained writes on rank 0 only once a process
    group exists (an earlier config's Trainer made one); before that, each rank saves its own copy."""
    dist = torch.distributed
    if not dist.is_initialized():
        path = os.path.join(out, f"pretrained_rank{os.environ['RANK']}")
        trainer_worker_model().save_pretrained(path)
        return path
    path = os.path.join(out, "pretrained")
    trainer_worker_model().save_pretrained(path)
    dist.barrier()
    return path


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """fp32 master weights, gathered (ZeRO-3 holds 1/world of each parameter per rank)."""
    return {n: safe_get_full_fp32_param(p).clone() for n, p in model.named_parameters()}


def main() -> None:
    torch.set_num_threads(1)
    for config in sys.argv[1:]:
        run(config, os.environ["DS_OUT"])


def run(config: str, out: str) -> None:
    stage = json.loads(Path(config).read_text())["zero_optimization"]["stage"]
    run_dir = os.path.join(out, f"trainer_stage{stage}")
    pretrained = None
    if stage == 3:  # the Trainer's ZeRO-3 path: from_pretrained under deepspeed.zero.Init
        pretrained = saved_model(out)
    t = trainer(run_dir, config, 4, pretrained)
    partitioned_at_init = all(hasattr(p, "ds_id") for p in t.model.parameters())
    t.train()
    chain = [type(t.optimizer).__name__, type(t.optimizer.optimizer).__name__,
             type(t.optimizer.optimizer.optimizer).__name__]
    client = t.optimizer.optimizer.optimizer
    straight = full_weights(t.model)
    names = {id(p): n for n, p in t.model.named_parameters()}
    result = {
        "partitioned_at_init": partitioned_at_init,
        "muon": sorted(names[id(ref())] for g, refs in zip(client.param_groups, client._lp_refs, strict=True)
                       if g["use_muon"] for ref in refs),
        "distributed_type": str(t.accelerator.distributed_type),
        "deepspeed_enabled": t.is_deepspeed_enabled,
        "chain": chain,
        "ns_calls": client.ns_calls,
        "zero_stage": t.model_wrapped.zero_optimization_stage(),
        "loss": [h["loss"] for h in t.state.log_history if "loss" in h],
    }
    t2 = trainer(run_dir + "_resumed", config, 4, pretrained)
    t2.train(resume_from_checkpoint=os.path.join(run_dir, "checkpoint-2"))
    resumed = full_weights(t2.model)
    result["resume_max_diff"] = max((straight[n] - resumed[n]).abs().max().item() for n in straight)
    result["resumed_ns_calls"] = t2.optimizer.optimizer.optimizer.ns_calls
    rank = torch.distributed.get_rank()
    with open(os.path.join(out, f"trainer_stage{stage}_rank{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
    exit_after_results()
