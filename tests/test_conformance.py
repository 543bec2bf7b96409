"""Conformance: every causal LM of transformers' auto mapping that builds offline from a tiny config (plus ViT,
BERT-style encoders, T5 and BART) routes cleanly, trains two MuonQ steps, and gets a Muon update with a flat
spectrum for every expert and every piece of every Muon matrix."""

import pytest
import torch
from test_matrices import planted_gradient
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
)
from zoo import CAUSAL_LM_TYPES, build, tiny_config

from muonq_hf import MuonQ
from muonq_hf.grouping import groups_from_routes, route
from muonq_hf.matrices import plan_of
from muonq_hf.orthogonalize import muon_scale

CASES = [(t, AutoModelForCausalLM) for t in CAUSAL_LM_TYPES] + [
    ("vit", AutoModelForImageClassification),
    ("bert", AutoModelForSequenceClassification),
    ("roberta", AutoModelForSequenceClassification),
    ("t5", AutoModelForSeq2SeqLM),
    ("bart", AutoModelForSeq2SeqLM),
]


def batch(model_type, cls, config, generator):
    if cls is AutoModelForImageClassification:
        return dict(pixel_values=torch.randn(2, 3, config.image_size, config.image_size, generator=generator),
                    labels=torch.tensor([0, 1]))
    ids = torch.randint(1, min(config.vocab_size, 100), (2, 16), generator=generator)
    if cls is AutoModelForSequenceClassification:
        return dict(input_ids=ids, labels=torch.tensor([0, 2]))
    return dict(input_ids=ids, labels=ids, use_cache=False)


def never_muon(model):
    """Parameters that must not be under Muon, found independently of the router: embeddings, the output
    embedding, norms, biases and vectors."""
    out = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        out.add(id(head.weight))
    for module in model.modules():
        if "Norm" in type(module).__name__:
            out.update(id(p) for p in module.parameters(recurse=False))
    out.update(id(p) for n, p in model.named_parameters() if p.ndim < 2 or n.endswith("bias"))
    return out


@pytest.mark.parametrize("model_type,cls", CASES, ids=[c[0] for c in CASES])
def test_routes_trains_and_orthogonalizes_every_matrix(model_type, cls):
    config = tiny_config(model_type)
    model = build(cls, config)
    routes = route(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    routed = [id(r.param) for r in routes]
    assert sorted(routed) == sorted({id(p) for p in trainable}) and len(set(routed)) == len(routed)
    forbidden = never_muon(model)
    wrong = [r.name for r in routes if r.muon and id(r.param) in forbidden]
    assert not wrong, f"{model_type}: under Muon although embedding/head/norm/bias: {wrong}"
    assert any(r.muon for r in routes), f"{model_type}: no Muon matrix at all"

    generator = torch.Generator().manual_seed(0)
    opt = MuonQ(groups_from_routes(routes), lr=1e-3)
    for _ in range(2):
        loss = model(**batch(model_type, cls, config, generator)).loss
        assert torch.isfinite(loss), f"{model_type}: loss {loss}"
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    # one default step on planted gradients (condition number 100 per expert x piece): flat updates
    muon = [(r, plan_of(r.param, g)) for g in opt.param_groups if g["use_muon"] for r in routes
            if any(r.param is p for p in g["params"])]
    fresh = MuonQ(groups_from_routes(routes), lr=1.0)
    before = {}
    for r, plan in muon:
        r.param.grad = planted_gradient(plan, r.param.shape, generator)
        before[id(r.param)] = r.param.detach().clone()
    fresh.step()
    for r, plan in muon:
        update = plan.view(before[id(r.param)] - r.param.detach())
        for b in range(len(plan.batches)):
            sv = torch.linalg.svdvals(plan.take(update, b).double()) / muon_scale(*plan.batch_shape(b))
            cond = float((sv[:, 0] / sv[:, -1]).max())
            assert cond < 2.5, f"{model_type}: {r.name} batch {b} {plan.batch_shape(b)}: condition number {cond:.2f}"
