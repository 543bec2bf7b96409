"""Group edits during training: a value the constructor refuses is refused at the next step too, naming the option
and the group, before any weight or state changes; a group switched between Muon and AdamW after steps is refused."""

import re

import pytest
import torch
from torch import nn

from muonq_hf import MuonQ, param_groups


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16), nn.LayerNorm(16), nn.Linear(16, 4))


def _step(model: nn.Module, opt: MuonQ, seed: int) -> None:
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(seed))
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _snapshot(model: nn.Module, opt: MuonQ) -> list[torch.Tensor]:
    weights = [p.detach().clone() for p in model.parameters()]
    state = [v.clone() for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    return weights + state


@pytest.mark.parametrize(("group", "key", "value", "message"), [
    ("muon", "lr", float("nan"), "lr=nan is not allowed"),
    ("adamw", "weight_decay", float("inf"), "weight_decay=inf is not allowed"),
    ("muon", "momentum", 1.5, "momentum=1.5 is not allowed"),
    ("muon", "lr", -0.01, "lr=-0.01 is not allowed"),
    ("muon", "bits", 5, "bits=5 is not allowed; bits must be one of 4, 8, 32"),
    ("muon", "ns_dtype", "fp16", "ns_dtype='fp16' is not allowed; ns_dtype must be 'bf16' or 'fp32'"),
    ("adamw", "betas", (1.0, 0.95), "betas=(1.0, 0.95) is not allowed"),
])
def test_a_bad_value_set_mid_run_is_refused_and_changes_nothing(group, key, value, message):
    """After 3 steps a group's option is set to a value the constructor refuses: the next step raises the
    constructor's error, naming the option and the group, and no bit of the weights or the state changed."""
    model = _model()
    opt = MuonQ(param_groups(model), lr=0.01)
    for seed in range(3):
        _step(model, opt, seed)
    g = next(i for i, grp in enumerate(opt.param_groups) if grp["use_muon"] == (group == "muon"))
    opt.param_groups[g][key] = value
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match=rf"{re.escape(message)}.*\(param group {g}; no state or weight was changed\)"):
        _step(model, opt, 3)
    after = _snapshot(model, opt)
    assert len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


@pytest.mark.parametrize("to_muon", [False, True])
def test_switching_use_muon_after_steps_is_refused_and_changes_nothing(to_muon):
    """use_muon flipped on a group that has stepped: its state is of the other kind, so the step refuses (and says
    what to do) before anything changes, instead of a KeyError after the step counts moved."""
    model = _model()
    matrices = [model[0].weight, model[2].weight]
    rest = [p for p in model.parameters() if all(p is not q for q in [*matrices, model[4].weight])]
    groups = [dict(params=matrices, use_muon=True), dict(params=[model[4].weight], use_muon=False),
              dict(params=rest, use_muon=False)]  # the head matrix in an AdamW group of its own
    opt = MuonQ(groups, lr=0.01)
    for seed in range(2):
        _step(model, opt, seed)
    g = 1 if to_muon else 0
    opt.param_groups[g]["use_muon"] = to_muon
    before = _snapshot(model, opt)
    other = "AdamW" if to_muon else "Muon"
    with pytest.raises(ValueError, match=rf"param group {g} has use_muon={to_muon}, but .* holds {other} state"):
        _step(model, opt, 2)
    after = _snapshot(model, opt)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


@pytest.mark.parametrize("use_muon", [True, False])
def test_a_complex_parameter_is_refused_by_name(use_muon):
    weight = nn.Parameter(torch.randn(8, 8, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"real floating-point parameters, got one of shape \(8, 8\) and dtype "
                                         r"torch.complex64; view a complex parameter as real"):
        MuonQ([dict(params=[weight], use_muon=use_muon)])
    opt = MuonQ([dict(params=[nn.Parameter(torch.randn(4, 4))], use_muon=True)])
    with pytest.raises(ValueError, match="torch.complex64"):
        opt.add_param_group(dict(params=weight, use_muon=use_muon))
    assert len(opt.param_groups) == 1  # the refused group was not added


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=16))


def _muon_names(tmp_path, **args) -> list[str]:
    from transformers import TrainingArguments

    from muonq_hf.hf import optimizer_cls_and_kwargs

    model = _tiny_gpt2()
    training = TrainingArguments(output_dir=str(tmp_path), optim="muonq", report_to="none", use_cpu=True, **args)
    _, kwargs = optimizer_cls_and_kwargs(training, model)
    names = {id(p): n for n, p in model.named_parameters()}
    return sorted(names[id(p)] for g in kwargs["params"] if g["use_muon"] for p in g["params"])


def test_optim_target_modules_selects_the_muon_modules(tmp_path):
    """HF's optim_target_modules (how GaLore-style optimizers are told their modules) selects MuonQ's Muon modules:
    the named attention matrices stay with Muon, the MLP matrices go to AdamW; "all-linear" keeps the routing's
    choice; a selection that names no Muon matrix is refused, naming the value."""
    every = _muon_names(tmp_path)
    attention = _muon_names(tmp_path, optim_target_modules=["attn"])
    assert attention == [n for n in every if ".attn." in n] and len(attention) == 4, attention
    assert _muon_names(tmp_path, optim_target_modules=r".*\.mlp\.c_fc") == [n for n in every if "mlp.c_fc" in n]
    assert _muon_names(tmp_path, optim_target_modules="all-linear") == every
    with pytest.raises(ValueError, match=r"optim_target_modules=\['wte'\] names no module whose matrix MuonQ steps"):
        _muon_names(tmp_path, optim_target_modules=["wte"])


def test_cycle_momentum_cycles_betas0_of_every_group_and_not_muons_momentum():
    """What the README says a cycle_momentum scheduler does with MuonQ: OneCycleLR cycles betas[0] (AdamW's beta1)
    in every group; Muon's momentum stays as set."""
    model = _model()
    opt = MuonQ(param_groups(model), lr=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.02, total_steps=10, cycle_momentum=True)
    for seed in range(3):
        _step(model, opt, seed)
        schedule.step()
    for group in opt.param_groups:
        assert group["momentum"] == 0.95 and group["betas"][0] != 0.9, (group["momentum"], group["betas"])
