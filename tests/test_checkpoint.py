"""Checkpoints of the packed state: plain tensors, saved dtypes kept, bit-exact resume."""

import copy
import io

import pytest
import torch
from torch import nn

from muonq_hf import MuonQ, param_groups


class TinyNet(nn.Module):
    """Embedding -> two hidden matrices (one a 4-D conv-like kernel) -> head, with norms and biases."""

    def __init__(self, vocab=64, d=32):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, x):
        h = self.norm(self.embed(x))
        return self.head(h + self.fc2(torch.relu(self.fc1(h))))


def train(model, opt, steps, seed_offset=0):
    for i in range(steps):
        g = torch.Generator().manual_seed(1000 + seed_offset + i)
        x = torch.randint(0, 64, (8, 16), generator=g)
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1).float(), x.roll(-1, 1).flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


CONFIGS = {
    "default": {},
    "adamw8": dict(adamw_bits=8),
    "stochastic": dict(stochastic_rounding=True),
    "blockwise_store_norm": dict(block_size=16, store_norm=True),
    "bits8_nesterov": dict(bits=8, nesterov=True),
    "fp32_muon": dict(bits=32, normalize=False, rank_divisor=0, mu=0.0),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_resume_is_bit_exact(name):
    torch.manual_seed(0)
    options = dict(CONFIGS[name], rank_divisor=CONFIGS[name].get("rank_divisor", 8))
    model = TinyNet()
    start = copy.deepcopy(model.state_dict())
    opt = MuonQ(param_groups(model, weight_decay=0.01), lr=0.01, **options)
    train(model, opt, 6)
    uninterrupted = copy.deepcopy(model.state_dict())

    resumed = TinyNet()
    resumed.load_state_dict(start)
    opt_a = MuonQ(param_groups(resumed, weight_decay=0.01), lr=0.01, **options)
    train(resumed, opt_a, 3)
    saved_model, saved_opt = roundtrip(resumed.state_dict()), roundtrip(opt_a.state_dict())

    fresh = TinyNet()
    fresh.load_state_dict(saved_model)
    opt_b = MuonQ(param_groups(fresh, weight_decay=0.01), lr=0.01, **options)
    opt_b.load_state_dict(saved_opt)
    train(fresh, opt_b, 3, seed_offset=3)
    for key, value in uninterrupted.items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_state_dict_is_packed_plain_tensors():
    model = TinyNet()
    opt = MuonQ(param_groups(model), lr=0.01, rank_divisor=8)
    train(model, opt, 2)
    sd = roundtrip(opt.state_dict())  # weights_only=True: no enums, dataclasses or tensor subclasses
    fc1 = next(st for st in sd["state"].values() if "res_codes" in st and st["res_codes"].shape == (128, 16))
    assert fc1["res_codes"].dtype == torch.uint8  # (m, ceil(n/2)): packed along the last dim
    assert fc1["res_scale"].dtype == torch.float16 and fc1["res_scale"].shape == (1,)
    assert fc1["P_codes"].shape == (128, 2) and fc1["R_codes"].shape == (1, 32, 2)  # r = 32 // 8 = 4
    assert fc1["P_scale"].shape == (1, 4) and fc1["R_scale"].dtype == torch.float16


def test_load_state_dict_keeps_saved_dtypes_with_bf16_params():
    """torch's Optimizer.load_state_dict casts floating state to the param dtype (fp16 scales -> bf16)."""
    model = TinyNet().to(torch.bfloat16)
    opt = MuonQ(param_groups(model), lr=0.01, rank_divisor=8, adamw_bits=8)
    train(model, opt, 2)
    saved = roundtrip(opt.state_dict())
    opt2 = MuonQ(param_groups(model), lr=0.01, rank_divisor=8, adamw_bits=8)
    opt2.load_state_dict(saved)
    n_checked = 0
    for (i, st), st2 in zip(saved["state"].items(), opt2.state_dict()["state"].values(), strict=True):
        for key, value in st.items():
            assert st2[key].dtype == value.dtype, (i, key)
            assert torch.equal(st2[key], value), (i, key)
            n_checked += 1
    dtypes = {v.dtype for st in saved["state"].values() for v in st.values()}
    assert {torch.uint8, torch.float16, torch.float32} <= dtypes and n_checked > 20
    # and torch's own loader would have cast them: the override is what keeps them
    plain = torch.optim.Optimizer.load_state_dict
    opt3 = MuonQ(param_groups(model), lr=0.01, rank_divisor=8)
    plain(opt3, saved)
    assert any(v.dtype == torch.bfloat16 for st in opt3.state.values() for k, v in st.items() if k == "res_scale")
