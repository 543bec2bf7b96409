"""Group edits during training: a value the constructor refuses is refused at the next step too, naming the option
and the group, before any weight or state changes; a group switched between Muon and AdamW after steps is refused."""

import re

import pytest
import torch
from torch import nn

from muonq_hf import MuonQ, param_groups
from muonq_hf.checkpoint import CheckpointError


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


# ------------------------------------------------------------------------------------------------ hooks
def _stepped(kind: str, **options) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = _model()
    opt = MuonQ(param_groups(model), lr=0.01, **options) if kind == "muonq" else torch.optim.AdamW(
        model.parameters(), lr=0.01)
    for seed in range(2):
        _step(model, opt, seed)
    return model, opt


def _floating(opt: torch.optim.Optimizer) -> list[tuple[int, str]]:
    """(parameter, entry) of every floating state entry but the step counts."""
    return [(i, k) for i, p in enumerate(p for g in opt.param_groups for p in g["params"])
            for k, v in opt.state[p].items() if k != "step" and torch.is_tensor(v) and v.is_floating_point()]


@pytest.mark.parametrize("kind", ["adamw", "muonq"])
def test_a_load_pre_hook_changes_what_is_loaded_as_for_torch_adamw(kind):
    """A load_state_dict pre-hook gets the dict first and its changes are what is loaded: doubling every floating
    entry (AdamW's moments; MuonQ's fp16 scales and fp32 moments too) loads them doubled, in their saved dtypes."""
    _, opt = _stepped(kind)
    saved = opt.state_dict()
    _, fresh = _stepped(kind)

    def double(optimizer, state_dict):
        state = {i: {k: v * 2 if torch.is_tensor(v) and v.is_floating_point() and k != "step" else v
                     for k, v in s.items()} for i, s in state_dict["state"].items()}
        return {**state_dict, "state": state}

    fresh.register_load_state_dict_pre_hook(double)
    fresh.load_state_dict(saved)
    entries = _floating(opt)
    assert entries and entries == _floating(fresh)
    params = [p for g in opt.param_groups for p in g["params"]]
    loaded = [p for g in fresh.param_groups for p in g["params"]]
    for i, key in entries:
        before, after = opt.state[params[i]][key], fresh.state[loaded[i]][key]
        assert after.dtype == before.dtype and torch.equal(after, before * 2), (i, key)


def test_a_load_pre_hook_runs_before_the_checks():
    """A pre-hook that mends a corrupt entry (a NaN scale) makes the checkpoint loadable; without it, it is refused."""
    _, opt = _stepped("muonq")
    saved = opt.state_dict()
    i, key = next((i, k) for i, s in saved["state"].items() for k in s if k == "res_scale")
    good = saved["state"][i][key].clone()
    saved["state"][i][key] = torch.full_like(good, float("nan"))
    _, fresh = _stepped("muonq")
    with pytest.raises(CheckpointError, match="res_scale"):
        fresh.load_state_dict(saved)

    def mend(optimizer, state_dict):
        state_dict["state"][i] = {**state_dict["state"][i], key: good}

    fresh.register_load_state_dict_pre_hook(mend)
    fresh.load_state_dict(saved)
    assert torch.equal(fresh.state[[p for g in fresh.param_groups for p in g["params"]][i]][key], good)


@pytest.mark.parametrize("kind", ["adamw", "muonq"])
def test_load_post_hooks_and_state_dict_hooks_run_as_for_torch_adamw(kind):
    """The load post-hook runs once, when the load is complete (for MuonQ after converting a state saved with
    bits=8 to the 4-bit codes asked for now); state_dict pre- and post-hooks run once each, and a post-hook's
    returned dict is what state_dict returns (for MuonQ with its own entry in it)."""
    _, opt = _stepped(kind, bits=8) if kind == "muonq" else _stepped(kind)
    calls = []
    opt.register_state_dict_pre_hook(lambda optimizer: calls.append("save pre"))
    opt.register_state_dict_post_hook(lambda optimizer, sd: calls.append(("save post", "muonq" in sd)) or
                                      {**sd, "extra": 1})
    saved = opt.state_dict()
    assert saved["extra"] == 1
    _, fresh = _stepped(kind)
    seen = []

    def after(optimizer):
        muon = [p for g in optimizer.param_groups if g.get("use_muon") for p in g["params"]]
        seen.append([optimizer.state[p]["res_codes"].shape[-1] for p in muon])

    fresh.register_load_state_dict_post_hook(after)
    fresh.load_state_dict(saved)
    assert calls == ["save pre", ("save post", kind == "muonq")], calls
    assert len(seen) == 1, seen
    if kind == "muonq":  # converted to 4-bit codes (two per byte) before the post-hook ran
        muon = [p for g in fresh.param_groups if g["use_muon"] for p in g["params"]]
        assert seen[0] == [-(-p.shape[1] // 2) for p in muon], seen


@pytest.mark.parametrize("kind", ["adamw", "muonq"])
def test_step_hooks_run_once_per_step_as_for_torch_adamw(kind):
    model, opt = _stepped(kind)
    calls = []
    opt.register_step_pre_hook(lambda optimizer, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda optimizer, args, kwargs: calls.append("post"))
    _step(model, opt, 5)
    assert calls == ["pre", "post"]


# ------------------------------------------------------------------------------- edits beyond the options
def _append_vector(opt, model):
    vector = nn.Parameter(torch.randn(7))
    vector.grad = torch.randn(7)
    opt.param_groups[0]["params"].append(vector)


def _wrong_gradient(shape=None, dtype=None):
    def edit(opt, model):
        p = model[2].weight  # the second Muon matrix: the first one would step before a late refusal
        p.grad.data = torch.randn(shape or p.shape, dtype=dtype or p.dtype)
    return edit


@pytest.mark.parametrize(("edit", "message"), [
    (lambda opt, model: opt.param_groups[0].update(qkv_split=16),  # fits (32, 16) and (16, 32), not the head's (4, 16)
     r"qkv_split=16 does not divide dim 0 \(size 4\)"),
    (lambda opt, model: opt.param_groups[1].pop("betas"), r"the option 'betas' is missing"),
    (lambda opt, model: opt.param_groups.append({"params": [model[3].weight]}), r"the option 'lr' is missing"),
    (_append_vector, r"use_muon=True needs tensors of >= 2 dims, got shape \(7,\)"),
    (_wrong_gradient(shape=(16, 16)), r"shape \(16, 32\) .* has a gradient of shape \(16, 16\)"),
    (_wrong_gradient(dtype=torch.float64), r"dtype torch.float32 has a gradient of shape \(16, 32\) and dtype "
                                           r"torch.float64"),
    (lambda opt, model: opt.param_groups[0]["params"].append(model[0].weight), r"listed twice"),
    (lambda opt, model: opt.param_groups[1].update(adamw_lr=0.0), r"adamw_lr changed from None to 0.0; adamw_lr sets "
                                                                  r"the lr of the AdamW groups when they are built"),
])
def test_an_edit_the_step_cannot_take_is_refused_and_changes_nothing(edit, message):
    """Edits beyond option values -- a plan that fits some of a group's matrices, a deleted option, a group appended
    without add_param_group, a vector in a Muon group, a gradient of another shape or dtype, a parameter listed twice
    -- are refused before the first weight or state changes (no half-applied step), naming what is wrong and the
    group; once undone, training goes on."""
    model = _model()
    opt = MuonQ([dict(params=[model[0].weight, model[2].weight, model[4].weight], use_muon=True),
                 dict(params=[model[0].bias, model[2].bias, model[3].weight, model[3].bias, model[4].bias],
                      use_muon=False)], lr=0.01)
    for seed in range(2):
        _step(model, opt, seed)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(2))
    model(x).square().mean().backward()
    groups = [dict(g, params=list(g["params"])) for g in opt.param_groups]
    edit(opt, model)
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match=rf"{message}.*\(param group \d; no state or weight was changed\)"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(model, opt), strict=True))
    opt.param_groups[:] = groups  # undone: the next steps work
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    _step(model, opt, 3)


def test_a_load_into_groups_edited_to_a_bad_plan_is_refused_before_anything_changes():
    model = _model()
    opt = MuonQ([dict(params=[model[0].weight, model[4].weight], use_muon=True),
                 dict(params=[p for i in (0, 2, 3, 4) for p in model[i].parameters() if p.ndim == 1 or i == 2],
                      use_muon=False)], lr=0.01)
    for seed in range(2):
        _step(model, opt, seed)
    saved = opt.state_dict()
    opt.param_groups[0]["qkv_split"] = 16
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match=r"qkv_split=16 does not divide .*\(param group 0; no state or weight"):
        opt.load_state_dict(saved)
    assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(model, opt), strict=True))


@pytest.mark.parametrize(("corrupt", "message"), [
    (lambda sd: sd.update(muonq={"skipped_steps": "x"}), r"the checkpoint's 'muonq' entry is \{'skipped_steps': 'x'\}"),
    (lambda sd: sd.update(muonq=None), r"'muonq' entry is None"),
    (lambda sd: sd.update(state=[]), r"'state' must be a dict and 'param_groups' a list, got a list"),
    (lambda sd: sd["param_groups"][0].update(params=5), r"param group 0 of the checkpoint is not a dict with a "
                                                        r"'params' list"),
])
def test_a_malformed_checkpoint_is_refused_before_anything_changes(corrupt, message):
    model = _model()
    opt = MuonQ(param_groups(model), lr=0.01)
    for seed in range(2):
        _step(model, opt, seed)
    saved = opt.state_dict()
    corrupt(saved)
    before = _snapshot(model, opt)
    with pytest.raises(CheckpointError, match=message):
        opt.load_state_dict(saved)
    assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(model, opt), strict=True))


def test_numpy_scalars_are_numbers():
    import numpy as np

    model = _model()
    opt = MuonQ(param_groups(model), lr=np.float32(0.01), weight_decay=np.float64(0.1))
    _step(model, opt, 0)
