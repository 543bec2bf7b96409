#!/usr/bin/env python
"""Causal language modelling with the HF Trainer, in the style of transformers' examples/pytorch/run_clm.py.

Data: ``--dataset_name [--dataset_config_name]`` (a datasets hub name or local builder), ``--train_file
[--validation_file]`` (.txt, .json/.jsonl with a "text" column, .csv), or by default the embedded corpus of
``examples/corpus.py`` (Python's documentation and stdlib sources; no network). Without ``--tokenizer_name`` a
byte-level BPE of ``--vocab_size`` is trained on the training texts.

Model: ``--model_name_or_path`` (a local checkpoint), or a new one from ``--model_type gpt2|llama`` with
``--n_layer --n_embd --n_head [--n_inner]`` and ``--config_overrides "resid_pdrop=0.0,..."``.

    python examples/run_clm.py --optim muonq --output_dir runs/clm --model_type gpt2 --n_layer 4 \\
        --n_embd 128 --n_head 4 --block_size 128 --max_steps 300 --use_cpu --report_to none

Importing ``muonq_hf`` registers ``--optim muonq``; an unmodified copy of this script would run it through
``python -m muonq_hf.run examples/run_clm.py ...`` instead.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass, field

import torch
import transformers
from corpus import DEFAULT_MAX_CHARS, DEFAULT_VOCAB_SIZE, group_texts, load_corpus_datasets, train_bpe_tokenizer
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    HfArgumentParser,
    LlamaConfig,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

import muonq_hf  # noqa: F401  (registers --optim muonq before the parser is built)
from muonq_hf.hf import OPTIM_NAME, parse_optim_args
from muonq_hf.memory import state_bytes

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "A local pretrained model to start from."})
    model_type: str = field(default="gpt2", metadata={"help": "New model from a config: gpt2 or llama."})
    n_layer: int = field(default=4, metadata={"help": "Transformer blocks (new model)."})
    n_embd: int = field(default=128, metadata={"help": "Hidden size (new model)."})
    n_head: int = field(default=4, metadata={"help": "Attention heads (new model)."})
    n_inner: int | None = field(default=None, metadata={"help": "MLP size (new model; default 4 * n_embd)."})
    config_overrides: str | None = field(
        default=None, metadata={"help": "Config overrides for a new model, e.g. 'resid_pdrop=0.0,embd_pdrop=0.0'."}
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "A local tokenizer; default: train a BPE."})
    vocab_size: int = field(default=DEFAULT_VOCAB_SIZE, metadata={"help": "Vocabulary of the on-the-fly BPE."})
    torch_dtype: str = field(
        default="float32",
        metadata={"help": "dtype the weights are kept in: float32, or bfloat16 / float16 for pure low-precision "
                  "training without an fp32 master copy (pair it with --optim_args weight_update=kahan or "
                  "stochastic; --bf16 instead keeps fp32 weights and computes in bf16)."},
    )


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "A datasets name (default: embedded corpus)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration name."})
    train_file: str | None = field(default=None, metadata={"help": "A .txt, .json/.jsonl or .csv training file."})
    validation_file: str | None = field(default=None, metadata={"help": "An evaluation file like train_file."})
    text_column: str = field(default="text", metadata={"help": "The text column of a dataset or json/csv file."})
    validation_split_percentage: int = field(
        default=5, metadata={"help": "Percent of train held out for eval when the data has no validation split."}
    )
    block_size: int = field(default=128, metadata={"help": "Tokens per training sequence."})
    max_corpus_chars: int = field(
        default=DEFAULT_MAX_CHARS, metadata={"help": "Characters of the embedded corpus to use."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N training blocks."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep the first N eval blocks."})
    data_cache_dir: str | None = field(
        default=None, metadata={"help": "Cache the tokenized embedded corpus here (default: no cache)."}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Accepted for compatibility (removed from TrainingArguments in 5.x)."}
    )


def load_user_texts(data_args: DataArguments, cache_dir: str | None) -> tuple[list[str], list[str]]:
    """Train and eval texts from --dataset_name or --train_file (eval: the validation split or a held-out tail)."""
    from datasets import load_dataset

    if data_args.dataset_name is not None:
        raw = load_dataset(data_args.dataset_name, data_args.dataset_config_name, cache_dir=cache_dir)
    else:
        files = {"train": data_args.train_file}
        if data_args.validation_file is not None:
            files["validation"] = data_args.validation_file
        suffix = data_args.train_file.rsplit(".", 1)[-1]
        builder = {"txt": "text", "jsonl": "json"}.get(suffix, suffix)
        raw = load_dataset(builder, data_files=files, cache_dir=cache_dir)
    column = data_args.text_column
    if column not in raw["train"].column_names:
        raise ValueError(f"--text_column {column!r} is not a column of the data; columns: {raw['train'].column_names}")
    train = [t for t in raw["train"][column] if t]
    if "validation" in raw:
        return train, [t for t in raw["validation"][column] if t]
    n_eval = max(1, len(train) * data_args.validation_split_percentage // 100)
    return train[:-n_eval], train[-n_eval:]


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_model(model_args: ModelArguments, tokenizer, block_size: int):
    if model_args.torch_dtype not in DTYPES:
        raise ValueError(f"--torch_dtype {model_args.torch_dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    return _new_or_loaded(model_args, tokenizer, block_size).to(DTYPES[model_args.torch_dtype])


def _new_or_loaded(model_args: ModelArguments, tokenizer, block_size: int):
    if model_args.model_name_or_path is not None:
        model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path)
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer))
        return model
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    inner = model_args.n_inner or 4 * model_args.n_embd
    if model_args.model_type == "gpt2":
        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=block_size,
            n_embd=model_args.n_embd,
            n_layer=model_args.n_layer,
            n_head=model_args.n_head,
            n_inner=inner,
            **ids,
        )
    elif model_args.model_type == "llama":
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=block_size,
            hidden_size=model_args.n_embd,
            intermediate_size=inner,
            num_hidden_layers=model_args.n_layer,
            num_attention_heads=model_args.n_head,
            num_key_value_heads=model_args.n_head,
            tie_word_embeddings=True,
            **ids,
        )
    else:
        raise ValueError(f"--model_type {model_args.model_type!r} is not supported; use gpt2 or llama")
    if model_args.config_overrides:
        config.update_from_string(model_args.config_overrides)
    return AutoModelForCausalLM.from_config(config)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if training_args.optim == OPTIM_NAME:
        parse_optim_args(training_args.optim_args)  # fail on a bad --optim_args before building anything
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    transformers.utils.logging.set_verbosity_warning()
    set_seed(training_args.seed)

    block_size = data_args.block_size
    if data_args.dataset_name is None and data_args.train_file is None:
        if model_args.tokenizer_name is not None:
            raise ValueError("--tokenizer_name needs --dataset_name or --train_file (the corpus trains its own BPE)")
        corpus = load_corpus_datasets(
            block_size, model_args.vocab_size, data_args.max_corpus_chars, cache_dir=data_args.data_cache_dir
        )
        tokenizer, train_dataset, eval_dataset = corpus.tokenizer, corpus.train, corpus.eval
    else:
        train_texts, eval_texts = load_user_texts(data_args, training_args.output_dir + "/hf_cache")
        if model_args.tokenizer_name is not None:
            tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name)
        else:
            tokenizer = train_bpe_tokenizer(train_texts, model_args.vocab_size)
        train_dataset = group_texts(train_texts, tokenizer, block_size)
        eval_dataset = group_texts(eval_texts, tokenizer, block_size)
    if data_args.max_train_samples is not None:
        train_dataset = train_dataset.select(range(min(data_args.max_train_samples, len(train_dataset))))
    if data_args.max_eval_samples is not None:
        eval_dataset = eval_dataset.select(range(min(data_args.max_eval_samples, len(eval_dataset))))

    model = build_model(model_args, tokenizer, block_size)
    n_params = sum(p.numel() for p in model.parameters())
    if training_args.process_index == 0:
        print(f"model: {model_args.model_type}, {n_params / 1e6:.2f}M parameters, vocab {len(tokenizer)}; "
              f"train {len(train_dataset)} blocks, eval {len(eval_dataset)} blocks of {block_size} tokens")

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=default_data_collator,
        processing_class=tokenizer,
    )
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics = dict(result.metrics)
    if training_args.save_strategy != "no":
        trainer.save_model()
    metrics.update(trainer.evaluate())
    metrics["perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
    if trainer.is_world_process_zero():
        optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # under Accelerate's wrapper
        sizes = state_bytes(optimizer)
        print(f"optimizer {training_args.optim.value}: state {sizes['total'] / 2**10:.1f} KiB")
        print(f"final eval_loss {metrics['eval_loss']:.4f} (perplexity {metrics['perplexity']:.2f})")
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
