"""Every option is checked where it enters (constructor, group, --optim_args, DeepSpeedMuonQ): exact types,
finite numbers, ranges; the error names the option, the value and what is allowed, and nothing is built."""

import math

import pytest
import torch
from torch import nn

from muonq_hf import MuonQ, param_groups
from muonq_hf.deepspeed import DeepSpeedMuonQ
from muonq_hf.options import RULES, parse_optim_args

# (option, bad value, what the message must say is allowed): the hostile inputs of issue 12 and their kin
BAD = [
    ("lr", math.inf, "a finite number >= 0"),
    ("lr", -0.1, "a finite number >= 0"),
    ("lr", "0.01", "a finite number >= 0"),
    ("weight_decay", math.nan, "a finite number >= 0"),
    ("weight_decay", "0.1", "a finite number >= 0"),
    ("mu", math.inf, "a finite number >= 0 (0 = linear codec)"),
    ("normalize", "false", "True or False"),
    ("nesterov", 1, "True or False"),
    ("ns_steps", True, "an int in [1, 100]"),
    ("ns_steps", 0, "an int in [1, 100]"),
    ("eps", "1e-8", "a finite number >= 0"),
    ("momentum", None, "a finite number in [0, 1)"),
    ("momentum", 1.0, "a finite number in [0, 1)"),
    ("seed", "abc", "an int >= 0"),
    ("seed", 1.5, "an int >= 0"),
    ("bits", True, "one of 4, 8, 32"),
    ("bits", 4.0, "one of 4, 8, 32"),
    ("adamw_bits", "8", "8 or 32"),
    ("block_size", 0, "None (one scale per matrix) or an int >= 1"),
    ("block_size", 16.0, "None (one scale per matrix) or an int >= 1"),
    ("rank_divisor", -1, "an int >= 0 (0 = no low-rank split)"),
    ("betas", (0.9, 1.0), "two finite numbers in [0, 1)"),
    ("betas", (0.9,), "two finite numbers in [0, 1)"),
    ("betas", (0.9, math.nan), "two finite numbers in [0, 1)"),
    ("adamw_lr", -1.0, "None or a finite number >= 0"),
    ("split_dim", False, "0 (rows) or 1 (columns)"),
    ("stochastic_rounding", "yes", "True or False"),
    ("store_norm", None, "True or False"),
]


def message(option, value, allowed):
    return f"MuonQ: {option}={value!r} is not allowed; {option} must be {allowed}"


@pytest.mark.parametrize("option,value,allowed", BAD, ids=[f"{o}={v!r}" for o, v, _ in BAD])
def test_bad_value_is_refused_in_constructor_group_and_deepspeed(option, value, allowed):
    expected = message(option, value, allowed)
    p = nn.Parameter(torch.randn(8, 8))
    with pytest.raises(ValueError) as err:
        MuonQ([p], **{option: value})
    assert str(err.value) == expected
    with pytest.raises(ValueError) as err:
        MuonQ([dict(params=[p], use_muon=True, **{option: value})])
    assert str(err.value) == expected
    with pytest.raises(ValueError) as err:
        DeepSpeedMuonQ([dict(params=[p], use_muon=True)], **{option: value})
    assert str(err.value) == expected


def test_every_option_has_a_rule_and_the_defaults_pass_it():
    opt = MuonQ([nn.Parameter(torch.randn(4, 4))])
    for name, (check, _) in RULES.items():
        assert check(opt.defaults[name]), f"default {name}={opt.defaults[name]!r} breaks its own rule"


def test_tensor_lr_and_numpy_free_numbers_are_accepted():
    MuonQ([nn.Parameter(torch.randn(4, 4))], lr=torch.tensor(0.01), weight_decay=0, mu=0, eps=0)


def test_huge_block_size_is_one_block_per_row_without_allocating_it():
    """block_size=10**9 used to pad each row to 10**9 values (128 GB); a block wider than the row is the row."""
    p, q = nn.Parameter(torch.randn(32, 16)), nn.Parameter(torch.randn(32, 16))
    q.data.copy_(p.data)
    a = MuonQ([dict(params=[p], use_muon=True)], block_size=10**9)
    b = MuonQ([dict(params=[q], use_muon=True)], block_size=16)
    g = torch.randn(32, 16)
    for opt, x in ((a, p), (b, q)):
        x.grad = g.clone()
        opt.step()
    assert torch.equal(p, q) and torch.equal(a.state[p]["res_codes"], b.state[q]["res_codes"])


def test_optim_args_values_go_through_the_same_rules():
    options = parse_optim_args("ns_steps=0")
    with pytest.raises(ValueError, match=r"^MuonQ: ns_steps=0 is not allowed; ns_steps must be an int in \[1, 100\]$"):
        MuonQ([nn.Parameter(torch.randn(4, 4))], **options)
    with pytest.raises(ValueError, match=r"momentum='x' is not valid; momentum must be a number"):
        parse_optim_args("momentum=x")


def test_ddp_shard_state_must_be_a_bool():
    with pytest.raises(ValueError, match=r"ddp_shard_state='yes' is not allowed; it must be True or False"):
        MuonQ([nn.Parameter(torch.randn(4, 4))], ddp_shard_state="yes")


def test_param_groups_weight_decay_default_reaches_the_optimizer():
    """The README's DeepSpeed example: MuonQ(param_groups(model), weight_decay=0.1) decays the matrices."""
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 8))
    opt = MuonQ(param_groups(model, adamw_names="2.weight"), lr=0.01, weight_decay=0.1)
    by_param = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert by_param[id(model[0].weight)] == 0.1 and by_param[id(model[2].weight)] == 0.1
    assert by_param[id(model[0].bias)] == 0.0 and by_param[id(model[1].weight)] == 0.0
