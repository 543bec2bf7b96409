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
    ("ns_dtype", "fp16", "'bf16' or 'fp32'"),
    ("ns_dtype", torch.bfloat16, "'bf16' or 'fp32'"),
    ("ns_coefficients", "jordan", "'quintic' or 'polar_express'"),
    ("ns_coefficients", None, "'quintic' or 'polar_express'"),
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
    """docs/distributed.md's DeepSpeed example: MuonQ(param_groups(model), weight_decay=0.1) decays the matrices."""
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 8))
    opt = MuonQ(param_groups(model, adamw_names="2.weight"), lr=0.01, weight_decay=0.1)
    by_param = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert by_param[id(model[0].weight)] == 0.1 and by_param[id(model[2].weight)] == 0.1
    assert by_param[id(model[0].bias)] == 0.0 and by_param[id(model[1].weight)] == 0.0


def test_a_flat_parameter_list_with_matrices_warns_that_nothing_gets_muon():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    with pytest.warns(UserWarning, match=r"MuonQ got 2 matrices but no use_muon=True group: every parameter is "
                                         r"updated by AdamW and nothing by Muon"):
        MuonQ(model.parameters())
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MuonQ([dict(params=list(model.parameters()), use_muon=False)])  # an explicit choice: no warning
        MuonQ(param_groups(model, adamw_names="1.weight"))


def test_sparse_gradients_and_empty_muon_parameters_are_refused_clearly():
    emb = nn.Embedding(10, 8, sparse=True)
    opt = MuonQ([dict(params=[emb.weight], use_muon=False)])
    emb(torch.tensor([1, 2])).sum().backward()
    before = emb.weight.detach().clone()
    with pytest.raises(ValueError, match=r"does not support sparse gradients \(parameters of shape \[\(10, 8\)\]\)"):
        opt.step()
    assert torch.equal(before, emb.weight) and not opt.state
    with pytest.raises(ValueError, match=r"got an empty parameter of shape \(0, 8\); put it in an AdamW group"):
        MuonQ([dict(params=[nn.Parameter(torch.randn(0, 8))], use_muon=True)])
    empty = nn.Parameter(torch.randn(0, 8))
    opt = MuonQ([dict(params=[empty], use_muon=False)])
    empty.grad = torch.zeros(0, 8)
    opt.step()  # an empty AdamW tensor is harmless


def test_unnormalized_momentum_of_large_gradients_does_not_overflow_its_scales():
    """normalize=False (the naive baseline): gradients of ~3e4 made momenta > 65504, fp16 scales inf, NaN weights."""
    p = nn.Parameter(torch.randn(16, 16))
    opt = MuonQ([dict(params=[p], use_muon=True)], lr=0.01, normalize=False, rank_divisor=0, mu=0.0)
    for _ in range(3):
        p.grad = torch.randn(16, 16) * 3e4
        opt.step()
    assert torch.isfinite(p).all() and opt.state[p]["res_scale"].dtype == torch.float32
    assert torch.isfinite(opt.state[p]["res_scale"]).all()


def test_a_zero_first_gradient_does_not_switch_the_low_rank_split_off():
    """The zero first gradient leaves R's columns at 0; they are re-seeded from the keyed Gaussian at the next
    step, so the split recovers (P has r orthonormal columns again), as the reference's Householder QR does."""
    from muonq_hf.codecs import dequantize

    p = nn.Parameter(torch.randn(32, 32))
    opt = MuonQ([dict(params=[p], use_muon=True)], lr=0.01, rank_divisor=8, bits=32)
    p.grad = torch.zeros(32, 32)
    opt.step()
    assert opt.state[p]["P"].abs().max() == 0  # rank-0 momentum: no factor survives
    p.grad = torch.randn(32, 32, generator=torch.Generator().manual_seed(0))
    opt.step()
    P = opt.state[p]["P"]  # (32, 4) fp32 with bits=32
    gram = P.T @ P
    off = float((gram - torch.eye(4)).abs().max())
    assert off < 1e-4, f"P^T P is off the identity by {off}: the split did not recover"
    q = nn.Parameter(torch.randn(32, 32))  # 4-bit codes too: the zero scale floor decodes to exact zeros
    opt = MuonQ([dict(params=[q], use_muon=True)], lr=0.01, rank_divisor=8)
    q.grad = torch.zeros(32, 32)
    opt.step()
    state = opt.state[q]
    assert (state["R_scale"] > 0).all()
    assert dequantize(state["R_codes"], state["R_scale"].unsqueeze(-2), 4, 4, 255.0, "column").abs().max() == 0
    q.grad = torch.randn(32, 32, generator=torch.Generator().manual_seed(0))
    opt.step()
    assert (opt.state[q]["R_codes"] != 0x88).any()  # live factors again


def test_fp16_adamw_parameters_stay_finite_where_a_gradient_entry_is_zero():
    p = nn.Parameter(torch.randn(8, 8).half())
    opt = MuonQ([dict(params=[p], use_muon=False)], lr=0.01)
    grad = torch.randn(8, 8).half()
    grad[0] = 0
    p.grad = grad
    opt.step()
    assert torch.isfinite(p).all()


def test_polar_express_coefficients_are_an_option_of_the_constructor_and_of_optim_args():
    """ns_coefficients="polar_express" reaches Newton-Schulz (the update differs from the quintic's, the state
    does not: the momentum does not depend on NS), from the constructor and from --optim_args."""
    assert parse_optim_args("ns_coefficients=polar_express") == {"ns_coefficients": "polar_express"}
    weights = {}
    for name in ("quintic", "polar_express"):
        p = nn.Parameter(torch.ones(32, 64))
        opt = MuonQ([dict(params=[p], use_muon=True)], lr=0.1, ns_coefficients=name)
        p.grad = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
        opt.step()
        weights[name] = (p.detach().clone(), opt.state[p]["res_codes"].clone())
    moved = (weights["quintic"][0] - weights["polar_express"][0]).abs().max()
    assert moved > 1e-3, f"the two schedules moved the weights alike (max difference {moved:.2e})"
    assert torch.equal(weights["quintic"][1], weights["polar_express"][1])
