"""Routing on the models people fine-tune: MoE experts and routers, fused projections, ViT, encoders, SSMs, PEFT."""

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
)
from zoo import build, tiny_config

from muonq_hf import MuonQ, param_groups
from muonq_hf.grouping import route
from muonq_hf.plan import main as plan_main
from muonq_hf.plan import report


def routes_of(model_type, cls=AutoModelForCausalLM, **kw):
    model = build(cls, tiny_config(model_type))
    return model, {r.name: r for r in route(model, **kw)}


def test_moe_experts_get_per_expert_plans_and_routers_go_to_adamw():
    _, routes = routes_of("mixtral")
    gate_up = routes["model.layers.0.mlp.experts.gate_up_proj"]
    assert gate_up.muon and gate_up.plan == dict(experts=True, qkv_split=2, split_dim=0, interleave=False)
    assert routes["model.layers.0.mlp.experts.down_proj"].plan == dict(experts=True)
    router = routes["model.layers.0.mlp.gate.weight"]
    assert not router.muon and router.reason == "MoE router"


def test_gpt_oss_interleaved_gate_up_and_expert_biases():
    _, routes = routes_of("gpt_oss")
    gate_up = routes["model.layers.0.mlp.experts.gate_up_proj"]  # (E, H, 2I), gate = [..., ::2]
    assert gate_up.plan == dict(experts=True, qkv_split=2, split_dim=1, interleave=True)
    for name in ("gate_up_proj_bias", "down_proj_bias"):
        bias = routes[f"model.layers.0.mlp.experts.{name}"]  # (E, out): stacked biases
        assert bias.param.ndim == 2 and not bias.muon and not bias.decay, name
    assert not routes["model.layers.0.mlp.router.weight"].muon


def test_undecorated_experts_layout_comes_from_the_down_proj_shapes():
    _, routes = routes_of("llama4_text")  # Llama4TextExperts has no experts flags; (E, H, 2I) with chunk(2, -1)
    gate_up = routes["model.layers.0.feed_forward.experts.gate_up_proj"]
    assert gate_up.plan == dict(experts=True, qkv_split=2, split_dim=1, interleave=False)
    assert "shapes of down_proj" in gate_up.note


def test_phi3_fused_gqa_qkv_and_gate_up_are_split():
    config = tiny_config("phi3")
    model = build(AutoModelForCausalLM, config)
    routes = {r.name: r for r in route(model)}
    head_dim = config.hidden_size // config.num_attention_heads
    qkv = routes["model.layers.0.self_attn.qkv_proj.weight"]
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    assert q != kv and qkv.plan == dict(piece_sizes=[q, kv, kv], split_dim=0)
    assert routes["model.layers.0.mlp.gate_up_proj.weight"].plan == dict(qkv_split=2, split_dim=0)
    split_off = {r.name: r for r in route(model, split_qkv=False)}
    assert split_off["model.layers.0.self_attn.qkv_proj.weight"].plan == {}


def test_vit_input_and_output_layers_go_to_adamw():
    _, routes = routes_of("vit", AutoModelForImageClassification)
    for name in ("vit.embeddings.cls_token", "vit.embeddings.position_embeddings",
                 "vit.embeddings.patch_embeddings.projection.weight", "classifier.weight"):
        assert not routes[name].muon, (name, routes[name].reason)
    assert routes["classifier.weight"].reason == "output layer"
    assert routes["vit.layers.0.attention.q_proj.weight"].muon


def test_encoders_and_seq2seq_heads():
    _, routes = routes_of("roberta", AutoModelForSequenceClassification)
    assert routes["classifier.dense.weight"].muon  # a hidden (d, d) layer of the head
    assert not routes["classifier.out_proj.weight"].muon  # num_labels outputs: the output layer
    _, routes = routes_of("bart", AutoModelForSeq2SeqLM)
    assert not any(r.muon for n, r in routes.items() if "embed" in n or "shared" in n)
    _, routes = routes_of("llama", AutoModelForSequenceClassification)
    assert routes["score.weight"].reason == "output layer"


def test_mamba_state_parameters_and_depthwise_conv_go_to_adamw_without_decay():
    _, routes = routes_of("mamba")
    assert not routes["backbone.layers.0.mixer.A_log"].muon and not routes["backbone.layers.0.mixer.A_log"].decay
    conv = routes["backbone.layers.0.mixer.conv1d.weight"]
    assert not conv.muon and conv.reason.startswith("depthwise conv")
    assert routes["backbone.layers.0.mixer.in_proj.weight"].muon


def test_peft_embedding_adapters_go_to_adamw_and_linear_adapters_to_muon():
    peft = pytest.importorskip("peft")
    model = build(AutoModelForCausalLM, tiny_config("llama"))
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"], trainable_token_indices=None)
    model = peft.get_peft_model(model, config)
    routes = {r.name: r for r in route(model)}
    lora_a = [r for n, r in routes.items() if "q_proj.lora_A" in n]
    emb = [r for n, r in routes.items() if "lora_embedding" in n]
    assert lora_a and all(r.muon for r in lora_a)
    assert len(emb) == 2 and not any(r.muon for r in emb), [(r.name, r.reason) for r in emb]
    model = build(AutoModelForCausalLM, tiny_config("llama"))
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=[1, 2]))
    delta = [r for r in route(model) if "trainable_tokens_delta" in r.name]
    assert delta and not any(r.muon for r in delta)


def test_name_patterns_move_parameters_either_way_and_typos_are_errors():
    model = build(AutoModelForCausalLM, tiny_config("mixtral"))
    routes = {r.name: r for r in route(model, adamw_names="*.self_attn.q_proj.weight", muon_names="mlp.gate.weight")}
    assert not routes["model.layers.1.self_attn.q_proj.weight"].muon
    assert routes["model.layers.1.mlp.gate.weight"].muon
    with pytest.raises(ValueError, match=r"adamw_names: pattern 'classifer\.\*' matches no trainable parameter; "
                                         r"similar names: \["):
        route(model, adamw_names="classifer.*")
    with pytest.raises(ValueError, match="is matched by adamw_names .* and by muon_names"):
        route(model, adamw_names="q_proj.weight", muon_names="*q_proj*")
    with pytest.raises(ValueError, match=r"muon_names 'norm.weight' matches model.norm.weight of shape \(32,\)"):
        route(model, muon_names="norm.weight")


def test_every_parameter_once_and_weight_decay_default_reaches_the_decaying_groups():
    model = build(AutoModelForCausalLM, tiny_config("qwen2_moe"))
    groups = param_groups(model)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters() if p.requires_grad) and len(set(ids)) == len(ids)
    opt = MuonQ(groups, lr=0.01, weight_decay=0.1)
    decays = {g["weight_decay"] for g in opt.param_groups}
    assert decays == {0.0, 0.1}, decays  # the optimizer's default applies where param_groups set nothing


def test_routing_report_lists_every_parameter_with_plan_and_bytes(capsys, tmp_path):
    model = build(AutoModelForCausalLM, tiny_config("gpt_oss"))
    text = report(route(model))
    line = next(x for x in text.splitlines() if x.startswith("model.layers.0.mlp.experts.gate_up_proj "))
    assert "Muon" in line and "4 x [2 x (32, 64) interleaved]" in line, line
    assert "MuonQ routing: Muon" in text.splitlines()[-1]
    plan_main(["--model_type", "qwen3_moe", "--optim_args", "bits=4,adamw_bits=8"])
    out = capsys.readouterr().out
    assert "mlp.experts.gate_up_proj" in out and "optimizer state" in out
    model.config.save_pretrained(tmp_path)
    plan_main([str(tmp_path)])
    assert "gate_up_proj" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no such directory or file"):
        plan_main([str(tmp_path / "missing")])


def test_two_steps_on_moe_train_every_expert_matrix():
    model = build(AutoModelForCausalLM, tiny_config("qwen3_moe"))
    opt = MuonQ(param_groups(model), lr=0.01)
    ids = torch.randint(1, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(2):
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert {n for n in before if "experts" in n} <= moved


def test_trainer_optim_args_name_patterns_and_routing_log(tmp_path, caplog):
    import logging

    from transformers import Trainer, TrainingArguments

    model = build(AutoModelForSequenceClassification, tiny_config("llama"))
    args = TrainingArguments(output_dir=str(tmp_path), optim="muonq", report_to=[], use_cpu=True,
                             optim_args="adamw_names=*.mlp.down_proj.weight;*.o_proj.weight,muon_names=score.weight")
    with caplog.at_level(logging.INFO, logger="transformers.muonq_hf"):
        opt = Trainer(model=model, args=args).create_optimizer()
    inner = getattr(opt, "optimizer", opt)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in inner.param_groups if g["use_muon"] for p in g["params"]}
    assert "score.weight" in muon and not any(n.endswith(("down_proj.weight", "o_proj.weight")) for n in muon)
    assert any("MuonQ routing: Muon" in r.getMessage() for r in caplog.records)
    args = TrainingArguments(output_dir=str(tmp_path), optim="muonq", report_to=[], use_cpu=True,
                             optim_args="adamw_names=scroe.weight")
    with pytest.raises(ValueError, match=r"adamw_names: pattern 'scroe.weight' matches no trainable parameter; "
                                         r"similar names: \['score.weight'"):
        Trainer(model=model, args=args).create_optimizer()


def test_moe_model_resumes_bit_exactly_through_the_optimizer_state_dict(tmp_path):
    """Trainer resume of transformers 5.x MoE checkpoints loses the expert weights for every optimizer (legacy
    per-expert keys, see docs/routing.md); the optimizer state itself round-trips: a plain loop resumes bit for bit."""
    config = tiny_config("qwen3_moe")

    def run(model, opt, steps):
        for step in steps:
            ids = torch.randint(1, 100, (2, 12), generator=torch.Generator().manual_seed(step))
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    straight = build(AutoModelForCausalLM, config)
    opt = MuonQ(param_groups(straight), lr=0.01, adamw_bits=8)
    run(straight, opt, range(4))
    first = build(AutoModelForCausalLM, config)
    opt1 = MuonQ(param_groups(first), lr=0.01, adamw_bits=8)
    run(first, opt1, range(2))
    torch.save({"model": first.state_dict(), "optim": opt1.state_dict()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed = build(AutoModelForCausalLM, config, seed=1)
    resumed.load_state_dict(saved["model"])
    opt2 = MuonQ(param_groups(resumed), lr=0.01, adamw_bits=8)
    opt2.load_state_dict(saved["optim"])
    run(resumed, opt2, range(2, 4))
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), f"{name}: resumed differs by {(a - b).abs().max()}"


def partition_like_zero3(model: torch.nn.Module) -> None:
    """What DeepSpeed ZeRO-3 (zero.Init or deepspeed.initialize) does to the attributes routing reads: each
    parameter keeps its object identity, holds an empty tensor and carries its shape in ds_shape."""
    for p in model.parameters():
        p.ds_shape, p.ds_id = p.shape, id(p)
        p.data = torch.empty(0, dtype=p.dtype)


@pytest.mark.parametrize("model_type", ["gpt2", "phi3", "mixtral", "gpt_oss"])
def test_zero3_partitioned_models_route_like_whole_ones(model_type):
    """Under ZeRO-3 the Trainer builds the model inside zero.Init: every parameter is empty when the optimizer is
    built. Routing, plans and the optimizer's checks read the shape from ds_shape, and identity-based rules
    (embeddings, tied and output layers) still hold: the routes equal the unpartitioned model's, key for key."""
    whole = {r.name: r for r in route(build(AutoModelForCausalLM, tiny_config(model_type)))}
    model = build(AutoModelForCausalLM, tiny_config(model_type))
    partition_like_zero3(model)
    parted = {r.name: r for r in route(model)}
    assert parted.keys() == whole.keys()
    for name, r in parted.items():
        w = whole[name]
        assert (r.muon, r.decay, r.reason, r.plan) == (w.muon, w.decay, w.reason, w.plan), name
    assert any(r.muon for r in parted.values()) and any(not r.muon for r in parted.values())
    MuonQ(param_groups(model))  # the use_muon checks and plans accept the partitioned parameters
