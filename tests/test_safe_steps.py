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
