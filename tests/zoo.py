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

# Causal LMs covered by the conformance suite: those whose tiny config builds offline (causal_lm_types_that_build(),
# refreshed by hand when transformers changes) and runs forward with TINY sizes; docs/routing.md lists them. Left out
# because the TINY sizes break their forward (rope/head-dim or SSM sizes), not their routing: axk2, bamba, codegen,
# gptj, granitemoehybrid, marian, minicpm3, sarvam_mla, xlstm, xmod, zamba2.
CAUSAL_LM_TYPES = [
    'afmoe', 'apertus', 'apertus1p5_text', 'arcee', 'aria_text', 'bailing_hybrid', 'bart', 'beam',
    'bert', 'bert-generation', 'big_bird', 'bigbird_pegasus', 'biogpt', 'bitnet', 'blenderbot', 'blenderbot-small',
    'bloom', 'camembert', 'cohere', 'cohere2', 'cohere2_moe', 'cpmant', 'ctrl', 'cwm', 'data2vec-text',
    'deepseek_v4', 'diffllama', 'doge', 'dory', 'electra', 'ernie', 'ernie4_5', 'ernie4_5_moe', 'exaone',
    'exaone4', 'exaone_moe', 'falcon_h1', 'falcon_mamba', 'flex_olmo', 'flint', 'gemma', 'gemma2', 'gemma3_text',
    'glm', 'glm4', 'glm4_moe', 'gpt-sw3', 'gpt2', 'gpt_bigcode', 'gpt_neo', 'gpt_neox', 'gpt_neox_japanese',
    'gpt_oss', 'granite', 'granite_swa', 'granitemoe', 'granitemoe_swa',
    'granitemoeshared', 'helium', 'hrm_text', 'hy_v3', 'hyperclovax', 'inkling_text', 'internlm3', 'iquestcoder',
    'jais2', 'jamba', 'jetmoe', 'kolibri1', 'laguna', 'lara_mini', 'lfm2', 'lfm3', 'llama', 'llama4_text', 'mamba',
    'mbart', 'megatron-bert', 'mellum', 'mimo_v2_flash', 'minimax', 'minimax_m2',
    'minimax_m3_vl_text', 'ministral3', 'mistral', 'mixtral', 'modernbert-decoder', 'moshi', 'mpt', 'mvp',
    'nanochat', 'nemotron_h', 'olmo', 'olmo2', 'olmo3', 'olmo_hybrid', 'olmoe', 'openai-gpt', 'opt', 'pegasus',
    'persimmon', 'phi', 'phi3', 'phimoe', 'plbart', 'qwen2', 'qwen2_moe', 'qwen3', 'qwen3_5_moe_text',
    'qwen3_5_text', 'qwen3_moe', 'qwen3_next', 'qwen4_exp_text', 'rembert', 'roberta', 'roberta-prelayernorm',
    'roformer', 'rwkv', 'sarvam_moe', 'seed_oss', 'smollm3', 'solar_open', 'stablelm', 'starcoder2',
    'trocr', 'vaultgemma', 'whisper', 'xglm', 'xlm', 'xlm-roberta', 'xlm-roberta-xl', 'zamba',
    'zaya',
]


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
    if getattr(config, "is_encoder_decoder", False) and getattr(config, "decoder_start_token_id", None) is None:
        config.decoder_start_token_id = 0  # T5's labels need it to shift
    layers = getattr(config, "num_hidden_layers", None)
    for key in ("layer_types", "mlp_only_layers"):  # per-layer lists follow the layer count
        value = getattr(config, key, None)
        if isinstance(value, list) and isinstance(layers, int) and len(value) > layers:
            setattr(config, key, value[:layers])
    if getattr(config, "head_dim", None) is not None and hasattr(config, "hidden_size"):
        config.head_dim = config.hidden_size // config.num_attention_heads
    return config


def build(model_cls, config, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model_cls.from_config(config).float()


def causal_lm_types_that_build(max_params: int = 3_000_000) -> list[str]:
    """Causal-LM model types whose tiny config builds offline with at most ``max_params`` parameters."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    out = []
    for model_type in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        try:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from transformers import AutoModelForCausalLM

                model = AutoModelForCausalLM.from_config(tiny_config(model_type))
        except Exception:  # noqa: BLE001 - a config that does not shrink this way is not covered
            continue
        if sum(p.numel() for p in model.parameters()) <= max_params:
            out.append(model_type)
    return out
