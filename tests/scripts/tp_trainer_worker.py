"""4-rank HF Trainer + tensor parallel worker (torchrun, gloo on CPU) for tests/test_hsdp.py.

A tiny LLaMA saved locally is loaded with ``from_pretrained(distributed_config=DistributedConfig(tp_size=2,
fsdp_size=2))``, transformers' way to shard a model at load time (its attention and MLP projections become
colwise / rowwise DTensors on a (dp, tp) mesh, FSDP2 on dp), and trained by the Trainer with ``--optim muonq``
for 4 steps. transformers refuses to save the optimizer state of such a model ("Resuming is not supported for
models sharded at load time"), so there is no resume here; the DCP round trip of this layout is tested in
tests/scripts/hsdp_worker.py, and the layout's equality with one process there too. Writes
$FSDP_OUT/trainer_rank{r}.json: the placements the optimizer saw, the losses, and whether every Muon matrix moved.
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

import torch.distributed as dist  # noqa: E402
from launch import exit_after_results  # noqa: E402
from tiny_hf import trainer_worker_data  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    DistributedConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
)

from muonq_hf import MuonQ  # noqa: E402


def saved_model(out: str) -> str:
    """A tiny LLaMA (vocab 96 as the data), saved once by rank 0: tensor parallel loads through from_pretrained."""
    path = os.path.join(out, "llama_tiny")
    if int(os.environ["RANK"]) == 0 and not os.path.exists(path):
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=96, max_position_embeddings=16)
        LlamaForCausalLM(config).save_pretrained(path)
    dist.barrier()
    return path


def trainer(out: str, path: str, max_steps: int) -> Trainer:
    args = TrainingArguments(
        output_dir=out, optim="muonq",
        max_steps=max_steps, learning_rate=0.01, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        save_strategy="no", logging_steps=1, report_to="none", seed=0, data_seed=0,
        lr_scheduler_type="constant", dataloader_num_workers=0,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(path, distributed_config=DistributedConfig(tp_size=2, fsdp_size=2))
    return Trainer(model=model, args=args, train_dataset=trainer_worker_data())


def full_weights(t: Trainer) -> dict[str, torch.Tensor]:
    params = t.model.named_parameters()
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in params}


def main() -> None:
    torch.set_num_threads(1)
    out = os.environ["FSDP_OUT"]
    dist.init_process_group("gloo")
    path = saved_model(out)
    res: dict = {}
    t1 = trainer(out, path, 4)
    before = full_weights(t1)
    t1.train()
    opt = t1.optimizer.optimizer if hasattr(t1.optimizer, "optimizer") else t1.optimizer
    res["is_fsdp_enabled"] = bool(t1.is_fsdp_enabled)
    res["is_muonq"] = isinstance(opt, MuonQ)
    muon = [p for g in opt.param_groups if g["use_muon"] for p in g["params"]]
    res["muon_params"] = len(muon)
    res["placements"] = sorted({str(tuple(p.placements)) if isinstance(p, DTensor) else "plain" for p in muon})
    res["losses"] = [h["loss"] for h in t1.state.log_history if "loss" in h]
    after = full_weights(t1)
    res["weights_finite"] = all(bool(torch.isfinite(w).all()) for w in after.values())
    muon_names = {n for n, p in t1.model.named_parameters() if any(p is q for q in muon)}
    res["muon_matrices_moved"] = all(not torch.equal(before[n], after[n]) for n in muon_names) and bool(muon_names)
    with open(os.path.join(out, f"trainer_rank{os.environ['RANK']}.json"), "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    main()
    exit_after_results()
