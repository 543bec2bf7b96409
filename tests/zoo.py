"""Tiny offline models of transformers' zoo, built from configs (no hub): the conformance suite's inputs."""

from __future__ import annotations

import warnings

import torch
from transformers import AutoConfig

# Size fields shrunk wherever a config has them (ints only); everything else keeps the config's default.
TINY = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=128, max_position_embeddings=64, moe_intermediate_size=16, shared_expert_intermediate_size=32,
    num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, n_layer=2, n_head=4,
    n_embd=32, d_model=32, num_layers=2, ffn_dim=64, n_positions=64, encoder_layers=2, decoder_layers=2,
    encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
    image_size=32, patch_size=8, num_labels=3,
)


def tiny_config(model_type: str, **overrides):
    """The config of ``model_type`` with the TINY sizes; token ids past the tiny vocab are dropped."""
    config = AutoConfig.for_model(model_type)
    for key, value in {**TINY, **overrides}.items():
        current = getattr(config, key, None)
        if isinstance(current, int) and not isinstance(current, bool):
            setattr(config, key, value)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value >= getattr(config, "vocab_size", 1 << 30):
            setattr(config, key, 0)
    if getattr(config, "head_dim", None) is not None and hasattr(config, "hidden_size"):
        config.head_dim = config.hidden_size // config.num_attention_heads
    return config


def build(model_cls, config, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model_cls.from_config(config).float()
