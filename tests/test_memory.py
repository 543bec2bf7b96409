"""state_bytes counts the tensors themselves; the MuonQ state of GPT-2-small matrices is >= 7x below fp32."""

import pytest
import torch
from torch import nn

from muonq_hf import MuonQ, state_bytes

# One GPT-2 small block (d = 768): the paper's mix of shapes. Every block is the same, so the ratio of
# one block is the ratio of the model's Muon part.
GPT2_SMALL_BLOCK = {
    "attn.c_attn": ((768, 2304), dict(qkv_split=3, split_dim=1)),  # Conv1D (in, out), fused q, k, v
    "attn.c_proj": ((768, 768), {}),
    "mlp.c_fc": ((768, 3072), {}),
    "mlp.c_proj": ((3072, 768), {}),
}


def one_step(groups, **options):
    opt = MuonQ(groups, lr=0.01, **options)
    for g in opt.param_groups:
        for p in g["params"]:
            p.grad = torch.randn_like(p)
    opt.step()
    return opt


def analytic_muonq_bytes(m: int, n: int, k: int = 1, rank_divisor: int = 16) -> int:
    """docs/design.md, "Memory": 0.5 bytes per residual element, 0.5 per factor element, fp16 scales."""
    mp, np_ = (m, n // k)
    r = min(mp, np_) // rank_divisor
    residual = k * mp * ((np_ + 1) // 2)
    factors = k * (mp * ((r + 1) // 2) + np_ * ((r + 1) // 2))
    scales = k * 2 + 2 * k * r * 2
    return residual + factors + scales


def test_gpt2_small_muon_state_is_at_least_7x_smaller_than_fp32_momentum():
    groups = [dict(params=[nn.Parameter(torch.zeros(shape))], use_muon=True, **extra)
              for shape, extra in GPT2_SMALL_BLOCK.values()]
    opt = one_step(groups)
    report = state_bytes(opt)
    numel = sum(g["params"][0].numel() for g in groups)
    step_bytes = report["muon"]["other"]  # one 4-byte step counter per matrix: not momentum state
    muon_bytes = report["muon"]["total"] - step_bytes
    assert step_bytes == 4 * len(groups)
    assert muon_bytes == sum(analytic_muonq_bytes(*shape, k=extra.get("qkv_split", 1))
                             for shape, extra in GPT2_SMALL_BLOCK.values())
    ratio = 4 * numel / muon_bytes
    assert ratio >= 7.0
    assert abs(ratio - 7.31) < 0.02  # the paper's figure for this mix of shapes
    assert report["muon"]["moments"] == 0 and report["muon"]["codes"] > report["muon"]["factors"]


def test_state_bytes_splits_groups_and_kinds():
    embed = nn.Parameter(torch.zeros(1000, 64))  # AdamW, >= 4096 elements: 8-bit moments
    norm = nn.Parameter(torch.zeros(64))  # AdamW, tiny: fp32 moments (like bitsandbytes' min_8bit_size)
    hidden = nn.Parameter(torch.zeros(64, 256))
    opt = one_step([dict(params=[hidden], use_muon=True), dict(params=[embed, norm])], adamw_bits=8)
    report = state_bytes(opt)
    assert report["adamw"]["codes"] == 2 * 1000 * 64  # m and v, one byte each
    assert report["adamw"]["scales"] == 2 * 1000 * 1 * 4  # one fp32 absmax per 256-block of each row
    assert report["adamw"]["moments"] == 2 * 64 * 4
    assert report["muon"]["codes"] == 64 * 128 and report["muon"]["factors"] == 64 * 2 + 256 * 2
    assert report["total"] == report["muon"]["total"] + report["adamw"]["total"]
    # fp32 AdamW for comparison: the 8-bit moments are ~4x smaller
    opt32 = one_step([dict(params=[nn.Parameter(torch.zeros(1000, 64))])])
    assert state_bytes(opt32)["adamw"]["moments"] == 2 * 1000 * 64 * 4


def test_state_bytes_counts_bitsandbytes_shared_qmaps_once():
    """bnb's AdamW8bit gives every 8-bit parameter the same two 256-entry fp32 maps: count them once."""
    import bitsandbytes as bnb

    big = torch.nn.Parameter(torch.randn(64, 128))  # 8192 >= bnb's min_8bit_size 4096: 8-bit moments
    small = torch.nn.Parameter(torch.randn(10))  # below it: fp32 moments
    big2 = torch.nn.Parameter(torch.randn(64, 128))
    opt = bnb.optim.AdamW8bit([big, small, big2], lr=1e-3)
    for p in (big, small, big2):
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[big]["qmap1"].data_ptr() == opt.state[big2]["qmap1"].data_ptr()  # shared, as assumed
    codes = 2 * 8192  # state1, state2: uint8
    absmax = 2 * 4 * (8192 // 256)  # fp32 per 256-element block, two moments
    qmaps = 2 * 256 * 4
    assert state_bytes(opt)["total"] == 2 * (codes + absmax) + qmaps + 2 * 10 * 4


def test_state_bytes_counts_the_inner_tensors_of_torchao_states():
    """torchao keeps each moment in a tensor subclass (codes, scales, a shared 16-entry map) whose data_ptr is 0:
    counted as tensors they all looked like one storage. Expected for a (512, 1024) weight, 4-bit, block 128:
    per moment 512*1024/2 code bytes + 4096 fp32 scales; the map (64 bytes) once per moment; the step 4 bytes."""
    torchao_optim = pytest.importorskip("torchao.optim")
    p = torch.nn.Parameter(torch.randn(512, 1024))
    p.grad = torch.randn_like(p)
    opt = torchao_optim.AdamW4bit([p])
    opt.step()
    per_moment = 512 * 1024 // 2 + 4096 * 4 + 16 * 4
    assert state_bytes(opt)["total"] == 2 * per_moment + 4, state_bytes(opt)
