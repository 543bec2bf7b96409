"""A plain HF training script (it never imports muonq_hf) and the tiny model/data the HF tests share.

As a script: ``python -m muonq_hf.run tests/scripts/tiny_hf.py --output_dir D --optim muonq --use_cpu ...``
trains a 2-layer GPT-2 on synthetic sequences. ``--resume_check`` (for torchrun) then trains a fresh model
from ``checkpoint-<save_steps>`` of that run and checks the final weights are bit-identical, and that the
optimizer state is identical on every rank. Rank 0 writes ``result.json`` in the output dir.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field

import torch
import transformers
from launch import exit_after_results
from transformers import GPT2Config, GPT2LMHeadModel, HfArgumentParser, Trainer, TrainingArguments

VOCAB, BLOCK = 512, 32


def tiny_model(seed: int = 0, dropout: float = 0.0, n_embd: int = 64, vocab: int = VOCAB) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab, n_positions=BLOCK, n_embd=n_embd, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
    )
    return GPT2LMHeadModel(config)


def trainer_worker_model() -> GPT2LMHeadModel:
    """The 2-layer GPT-2 of the distributed Trainer workers (FSDP2, DeepSpeed): vocab 96, 16 positions."""
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=16, n_embd=40, n_layer=2, n_head=4))


def trainer_worker_data():
    """64 random sequences of 16 tokens for ``trainer_worker_model``, as a ``datasets.Dataset``."""
    from datasets import Dataset

    ids = torch.randint(0, 96, (64, 16), generator=torch.Generator().manual_seed(0))
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


class TinyDataset(torch.utils.data.Dataset):
    """n learnable sequences: token t+1 = (a * token t + b) mod vocab with (a, b, start) drawn per sequence."""

    def __init__(self, n: int = 64, seed: int = 1, vocab: int = VOCAB) -> None:
        g = torch.Generator().manual_seed(seed)
        a = torch.randint(1, 8, (n, 1), generator=g)
        b = torch.randint(0, vocab, (n, 1), generator=g)
        x = torch.randint(0, vocab, (n, 1), generator=g)
        rows = [x]
        for _ in range(BLOCK - 1):
            rows.append((a * rows[-1] + b) % vocab)
        self.ids = torch.cat(rows, dim=1)  # (n, BLOCK)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def state_digest(optimizer: torch.optim.Optimizer) -> str:
    """sha256 over every optimizer state tensor, in parameter order: equal digests = identical state."""
    h = hashlib.sha256()
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in sorted(optimizer.state[p].items()):
                if torch.is_tensor(value):
                    h.update(key.encode())
                    h.update(value.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class ScriptArguments:
    resume_check: bool = field(default=False, metadata={"help": "Resume from checkpoint-<save_steps> and compare."})
    dropout: float = field(default=0.1, metadata={"help": "Dropout of the tiny model (exercises the RNG restore)."})


def train_tiny(args: TrainingArguments, dropout: float, resume: str | None = None) -> Trainer:
    # the resumed run starts from other weights: only a real load of the checkpoint can make it match
    model = tiny_model(seed=0 if resume is None else 123, dropout=dropout)
    trainer = Trainer(model=model, args=args, train_dataset=TinyDataset())
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def main() -> None:
    script_args, args = HfArgumentParser((ScriptArguments, TrainingArguments)).parse_args_into_dataclasses()
    trainer = train_tiny(args, script_args.dropout)
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    result = {
        "transformers": transformers.__version__,
        "optimizer": type(optimizer).__name__,
        "world_size": args.world_size,
        "parallel_mode": str(args.parallel_mode),
        "steps": trainer.state.global_step,
        "digest": state_digest(optimizer),
    }
    if script_args.resume_check:
        weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        checkpoint = os.path.join(args.output_dir, f"checkpoint-{int(args.save_steps)}")
        resumed = train_tiny(args, script_args.dropout, resume=checkpoint)
        resumed_opt = getattr(resumed.optimizer, "optimizer", resumed.optimizer)
        result["resume_exact"] = all(torch.equal(weights[k], v) for k, v in resumed.model.state_dict().items())
        result["resume_digest_equal"] = state_digest(resumed_opt) == result["digest"]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        digests = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(digests, result["digest"])
        result["rank_digests"] = digests
    if args.process_index == 0:
        with open(os.path.join(args.output_dir, "result.json"), "w") as f:
            json.dump(result, f)
    print("RESULT", json.dumps(result), file=sys.stderr)


if __name__ == "__main__":
    main()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        exit_after_results()  # under torchrun: results are written, skip the teardown
