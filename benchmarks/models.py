"""Model shapes for the benchmarks, built from configs (no weights are downloaded)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

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
    # MoE: Qwen3-MoE-shaped, every layer sparse, 64 experts (top 8) stored as 3-D tensors: (64, 768, 1024)
    # gate_up and (64, 1024, 384) down per layer, ~0.7B parameters, 0.6B of them in experts.
    "qwen3-moe-64": ("qwen3_moe", dict(
        hidden_size=1024, intermediate_size=2816, moe_intermediate_size=384, num_experts=64, num_experts_per_tok=8,
        num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4, head_dim=64, vocab_size=32000,
        max_position_embeddings=2048, tie_word_embeddings=False, mlp_only_layers=[], decoder_sparse_step=1,
    )),
    "qwen3-moe-tiny": ("qwen3_moe", dict(
        hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=64, num_experts_per_tok=8,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512,
        max_position_embeddings=128, tie_word_embeddings=False, mlp_only_layers=[], decoder_sparse_step=1,
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


ARCHITECTURES: dict[str, tuple[type[PretrainedConfig], type[nn.Module]]] = {
    "gpt2": (GPT2Config, GPT2LMHeadModel),
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM),
}


def config_for(name: str, **overrides) -> PretrainedConfig:
    if name not in SHAPES:
        raise ValueError(f"unknown model shape {name!r}; known: {sorted(SHAPES)}")
    arch, kwargs = SHAPES[name]
    return ARCHITECTURES[arch][0](**{**kwargs, **overrides})


def build_model(
    name: str, device: str | torch.device = "cpu", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides
) -> nn.Module:
    """The model of shape ``name`` in ``dtype``; on ``device="meta"`` only shapes exist (no memory, no init cost)."""
    config = config_for(name, **overrides)
    torch.manual_seed(seed)
    cls = ARCHITECTURES[SHAPES[name][0]][1]
    with torch.device(device):
        return cls(config).to(dtype)
