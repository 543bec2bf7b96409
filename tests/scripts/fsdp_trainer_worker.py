"""HF Trainer + FSDP2 worker (torchrun, gloo on CPU) for tests/test_fsdp2.py (2 ranks) and tests/test_hsdp.py (4).

``--optim muonq --fsdp full_shard`` (fsdp_config version 2) trains a tiny GPT-2 for 4 steps saving at step 2,
then a fresh Trainer resumes from checkpoint-2. ``--layout``:
  fsdp      (default) FSDP2 over every rank, with the full and the sharded state-dict types;
  hsdp      HSDP 2 x 2 from ``parallelism_config=ParallelismConfig(dp_replicate_size=2, dp_shard_size=2)``;
  hsdp-env  HSDP with the layout from Accelerate's environment (``accelerate launch --config_file
            examples/accelerate/hsdp.yaml``), the Trainer given no FSDP arguments.
The HSDP layouts save the sharded state dict. Writes $FSDP_OUT/trainer_rank{r}.json: whether FSDP really ran,
the parameter/state layouts, and whether the resumed weights equal the uninterrupted ones bit for bit.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

import muonq_hf  # noqa: F401, I001  (registers --optim muonq before transformers is imported)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import accelerate_cpu_fixture  # noqa: E402

accelerate_cpu_fixture.install()

from accelerate import ParallelismConfig  # noqa: E402
from launch import exit_after_results  # noqa: E402
from tiny_hf import trainer_worker_data, trainer_worker_model  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from muonq_hf import MuonQ  # noqa: E402

LAYOUT = sys.argv[sys.argv.index("--layout") + 1] if "--layout" in sys.argv else "fsdp"


def trainer(out: str, max_steps: int, state_dict_type: str) -> Trainer:
    fsdp_config = {"version": 2, "transformer_layer_cls_to_wrap": ["GPT2Block"], "state_dict_type": state_dict_type}
    layout = {} if LAYOUT == "hsdp-env" else dict(fsdp="full_shard", fsdp_config=fsdp_config)
    if LAYOUT == "hsdp":
        layout["parallelism_config"] = ParallelismConfig(dp_replicate_size=2, dp_shard_size=2)
    args = TrainingArguments(
        output_dir=out, optim="muonq", **layout,
        max_steps=max_steps, learning_rate=0.01, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        save_steps=2, save_strategy="steps", logging_steps=1, report_to="none", seed=0, data_seed=0,
        lr_scheduler_type="constant", dataloader_num_workers=0,
    )  # fmt: skip
    return Trainer(model=trainer_worker_model(), args=args, train_dataset=trainer_worker_data())


def full_weights(t: Trainer) -> dict[str, torch.Tensor]:
    params = t.model.named_parameters()
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in params}


def run(out: str, state_dict_type: str) -> dict:
    res: dict = {}
    t1 = trainer(out, 4, state_dict_type)
    t1.train()
    opt = t1.optimizer.optimizer if hasattr(t1.optimizer, "optimizer") else t1.optimizer
    res["is_fsdp_enabled"] = bool(t1.is_fsdp_enabled)
    res["distributed_type"] = str(t1.accelerator.state.distributed_type)
    res["fsdp_version"] = t1.accelerator.state.fsdp_plugin.fsdp_version
    res["state_dict_type"] = str(t1.accelerator.state.fsdp_plugin.state_dict_type)
    res["is_muonq"] = isinstance(opt, MuonQ)
    muon = [p for g in opt.param_groups if g["use_muon"] for p in g["params"]]
    res["muon_params"] = len(muon)
    res["muon_params_dtensor"] = all(isinstance(p, DTensor) for p in muon)
    res["muon_codes_dtensor"] = all(isinstance(opt.state[p]["res_codes"], DTensor) for p in muon)
    res["placements"] = sorted({str(tuple(p.placements)) for p in muon})
    res["losses"] = [h["loss"] for h in t1.state.log_history if "loss" in h]
    final = full_weights(t1)
    t2 = trainer(out, 4, state_dict_type)
    t2.train(resume_from_checkpoint=os.path.join(out, "checkpoint-2"))
    resumed = full_weights(t2)
    res["resumed_equal"] = final.keys() == resumed.keys() and all(torch.equal(final[k], resumed[k]) for k in final)
    res["resumed_max_diff"] = max(float((final[k] - resumed[k]).abs().max()) for k in final)
    return res


def main() -> None:
    torch.set_num_threads(1)
    out, rank = os.environ["FSDP_OUT"], int(os.environ["RANK"])
    kinds = ("FULL_STATE_DICT", "SHARDED_STATE_DICT") if LAYOUT == "fsdp" else ("SHARDED_STATE_DICT",)
    res = {kind: run(os.path.join(out, kind), kind) for kind in kinds}
    with open(os.path.join(out, f"trainer_rank{rank}.json"), "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    main()
    exit_after_results()
