"""param_groups: the Muon/AdamW split on HF causal LMs (tied and untied heads) and plain modules."""

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from muonq_hf import MuonQ, param_groups


def names_by_group(model, groups):
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [sorted(name_of[id(p)] for p in g["params"]) for g in groups]


def test_gpt2_split():
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=16))
    groups = param_groups(model, weight_decay=0.1)
    assert [(g["use_muon"], g.get("qkv_split", 1), g["weight_decay"]) for g in groups] == [
        (True, 1, 0.1), (True, 3, 0.1), (False, 1, 0.1), (False, 1, 0.0)
    ]
    muon, fused, adamw, no_decay = names_by_group(model, groups)
    assert fused == ["transformer.h.0.attn.c_attn.weight", "transformer.h.1.attn.c_attn.weight"]
    assert groups[1]["split_dim"] == 1  # Conv1D stores (in, out) = (d, 3d): q, k, v are column blocks
    assert "transformer.h.0.mlp.c_fc.weight" in muon and "transformer.h.0.attn.c_proj.weight" in muon
    # the tied wte/lm_head appears once, with AdamW; so does the position embedding
    assert adamw == ["transformer.wpe.weight", "transformer.wte.weight"]
    assert all(n.endswith(("bias", "weight")) and ("ln" in n or "bias" in n) for n in no_decay)
    n_total = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for g in groups for p in g["params"]) == n_total


def test_llama_untied_head_and_frozen_params():
    config = LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.model.layers[0].mlp.gate_proj.weight.requires_grad_(False)
    groups = param_groups(model)
    muon, adamw, no_decay = names_by_group(model, groups)
    assert "lm_head.weight" in adamw and "model.embed_tokens.weight" in adamw  # via get_*_embeddings()
    assert "model.layers.0.mlp.gate_proj.weight" not in sum(names_by_group(model, groups), [])
    assert "model.layers.1.self_attn.q_proj.weight" in muon and len(muon) == 2 * 7 - 1
    assert all("norm" in n for n in no_decay)
    assert not any("qkv_split" in g for g in groups)  # separate q/k/v: nothing to split


def test_plain_module_conv_and_named_head():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    muon, no_decay = names_by_group(model, param_groups(model))
    assert muon == ["0.weight", "3.weight"] and "1.weight" in no_decay and "0.bias" in no_decay
    muon, adamw, _ = names_by_group(model, param_groups(model, adamw_names=("3.weight",), weight_decay=0.1))
    assert muon == ["0.weight"] and adamw == ["3.weight"]


def test_options_are_copied_and_groups_feed_muonq():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=100, n_positions=16))
    groups = param_groups(model, bits=8, adamw_bits=8)
    assert all(g["bits"] == 8 and g["adamw_bits"] == 8 for g in groups)
    opt = MuonQ(groups, lr=0.01)
    x = torch.randint(0, 100, (2, 8))
    model(x, labels=x).loss.backward()
    opt.step()
    assert all(opt.state[p] for g in opt.param_groups for p in g["params"])


def test_unknown_option_in_param_groups_is_rejected_by_muonq():
    model = nn.Linear(4, 4)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['bitz'\]"):
        MuonQ(param_groups(model, bitz=4))
