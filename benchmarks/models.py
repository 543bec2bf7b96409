"""Model shapes for the benchmarks, built from configs (no weights are downloaded)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

# name -> (architecture, config kwargs). LLaMA-1B is Llama-3.2-1B-shaped (tied embeddings, GQA 32/8 heads).
SHAPES: dict[str, tuple[str, dict]] = {
    "gpt2-small": ("gpt2", dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024)),
    "gpt2-medium": ("gpt2", dict(n_embd=1024, n_layer=24, n_head=16, vocab_size=50257, n_positions=1024)),
    "llama-1b": (
        "llama",
        dict(
            hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
            num_key_value_heads=8, vocab_size=128256, max_position_embeddings=2048, tie_word_embeddings=True,
        ),
    ),
    # CPU speed model: GPT-2-small layer shapes (768 wide), 2 layers, vocabulary 8192 so that the Muon/AdamW
    # parameter split (14.2M matrix : 7.1M embedding) is close to GPT-2 small's (85M : 39M).
    "gpt2-small-2l": (
        "gpt2",
        dict(n_embd=768, n_layer=2, n_head=12, vocab_size=8192, n_positions=1024, bos_token_id=0, eos_token_id=0),
    ),
    # Launch-bound shapes: many small matrices, where per-op overhead dominates a step as launches do on a GPU
    # (benchmarks/launches.py counts kernels on them; the CPU speed run times the deep, narrow one).
    "gpt2-24x64": ("gpt2", dict(
        n_embd=64, n_layer=24, n_head=4, vocab_size=1024, n_positions=128, bos_token_id=0, eos_token_id=0,
    )),
    "gpt2-12x256": ("gpt2", dict(
        n_embd=256, n_layer=12, n_head=4, vocab_size=1024, n_positions=128, bos_token_id=0, eos_token_id=0,
    )),
    # Small models: memory verification, quick CLI mode, quality study.
    "gpt2-tiny": ("gpt2", dict(
        n_embd=128, n_layer=2, n_head=4, vocab_size=4096, n_positions=128, bos_token_id=0, eos_token_id=0,
    )),
    "llama-tiny": (
        "llama",
        dict(
            hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=4096, max_position_embeddings=128, tie_word_embeddings=True,
        ),
    ),
}


def config_for(name: str, **overrides) -> GPT2Config | LlamaConfig:
    if name not in SHAPES:
        raise ValueError(f"unknown model shape {name!r}; known: {sorted(SHAPES)}")
    arch, kwargs = SHAPES[name]
    return (GPT2Config if arch == "gpt2" else LlamaConfig)(**{**kwargs, **overrides})


def build_model(
    name: str, device: str | torch.device = "cpu", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides
) -> nn.Module:
    """The model of shape ``name`` in ``dtype``; on ``device="meta"`` only shapes exist (no memory, no init cost)."""
    config = config_for(name, **overrides)
    torch.manual_seed(seed)
    cls = GPT2LMHeadModel if isinstance(config, GPT2Config) else LlamaForCausalLM
    with torch.device(device):
        return cls(config).to(dtype)
