"""Shape groups: same-plan matrices of different parameters stepped together (backends.common.muon_groups, their
state in a bank) and small AdamW tensors through foreach ops (adamw_batches): the values of one-by-one steps, bit
for bit, and fewer kernel launches. Groups of CUDA's size are forced here (MuonQ(batch_elements=...))."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from launch import run_two_ranks, worker_env
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from zoo import build, tiny_config

from muonq_hf import MuonQ, param_groups
from muonq_hf.backends.common import muon_groups

BATCH = 1 << 23  # batches forced on the CPU (off there by default)


def gpt2(layers: int = 3) -> GPT2LMHeadModel:
    torch.manual_seed(0)  # fused QKV (3 pieces), square and rectangular matrices, several of each shape
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=layers, n_head=4, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def mixtral() -> torch.nn.Module:  # stacked experts (E, 2I, H) with gate/up halves, 2 layers
    return build(AutoModelForCausalLM, tiny_config("mixtral", num_hidden_layers=2))


def train(model: torch.nn.Module, opt: MuonQ, steps: range) -> None:
    for step in steps:
        ids = torch.randint(0, min(64, model.config.vocab_size), (2, 16), generator=torch.Generator().manual_seed(step))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def assert_same(a: torch.nn.Module, b: torch.nn.Module, opt_a: MuonQ, opt_b: MuonQ) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), f"{name}: max diff {(p - q).abs().max():.3g}"
    sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for key in sa[i]:
            assert torch.equal(sa[i][key], sb[i][key]), f"state {i} {key}"


@pytest.mark.parametrize(("make", "options"), [
    (gpt2, {}), (gpt2, {"bits": 8, "block_size": 16}), (gpt2, {"nesterov": True, "store_norm": True}),
    (gpt2, {"bits": 32}), (mixtral, {}),
])
def test_batched_steps_equal_one_by_one_steps(make, options):
    """4 steps (the first one's keyed Gaussians included) and a resume through state_dict: weights and every
    state entry equal one-by-one MuonQ bit for bit (GPT-2: fused QKV pieces; Mixtral: stacked experts)."""
    model = make()
    reference = copy.deepcopy(model)
    opt = MuonQ(param_groups(model), lr=0.02, batch_elements=BATCH, **options)
    tasks, state = opt._tasks(), opt.state
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    assert all(len(g) == 1 for g in muon_groups(tasks, state, 0))  # batch_elements=0: one by one
    batches = muon_groups(tasks, state, BATCH)
    layers, muon = model.config.num_hidden_layers, [t for t in tasks if t.group["use_muon"]]
    assert all(len(b) >= layers for b in batches), [len(b) for b in batches]  # one batch per shape and group
    assert sum(map(len, batches)) == len(muon)  # every Muon matrix is in a batch
    model.zero_grad(set_to_none=True)
    ref_opt = MuonQ(param_groups(reference), lr=0.02, batch_elements=0, **options)
    train(reference, ref_opt, range(4))
    train(model, opt, range(2))
    resumed = copy.deepcopy(model)
    resumed_opt = MuonQ(param_groups(resumed), lr=0.02, batch_elements=BATCH, **options)
    resumed_opt.load_state_dict(opt.state_dict())
    train(resumed, resumed_opt, range(2, 4))
    assert_same(resumed, reference, resumed_opt, ref_opt)


def test_a_batch_never_mixes_first_and_later_steps_and_stochastic_rounding_stays_per_parameter():
    """A matrix whose first gradient comes late starts from its keyed Gaussian like the others did; groups with
    stochastic rounding (noise keyed per parameter) are not batched."""
    model, reference = gpt2(), gpt2()
    late = "transformer.h.1.mlp.c_fc.weight"
    opts = [MuonQ(param_groups(m), lr=0.02, batch_elements=b) for m, b in ((model, BATCH), (reference, 0))]
    for step in range(3):
        for m, opt in zip((model, reference), opts, strict=True):
            ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(step))
            m(input_ids=ids, labels=ids).loss.backward()
            if step == 0:
                m.get_parameter(late).grad = None  # no gradient at step 0: its first step is step 1
            opt.step()
            opt.zero_grad(set_to_none=True)
    assert_same(model, reference, *opts)
    stochastic = MuonQ(param_groups(gpt2(), stochastic_rounding=True), lr=0.02)
    for p in stochastic.param_groups[0]["params"]:
        p.grad = torch.zeros_like(p)
    assert all(len(g) == 1 for g in muon_groups(stochastic._tasks(), stochastic.state, BATCH))


@pytest.mark.parametrize("value", [-1, 2.5, True, "8M"])
def test_bad_batch_elements_are_refused(value):
    with pytest.raises(ValueError, match=rf"batch_elements={value!r} is not allowed; it must be None .* 0 .* int"):
        MuonQ(param_groups(gpt2()), batch_elements=value)


def test_a_step_launches_fewer_kernels_than_torch_optim_muon_and_adamw():
    """The point of shape groups on a GPU: on a 12-layer GPT-2, MuonQ's step dispatches fewer kernels than
    torch.optim.Muon + AdamW (benchmarks/launches.py: a fused call counts as one kernel, bf16 products native as
    on a GPU), and far fewer than one matrix at a time. Measured here: 605 vs 1,908, and 7,613 one by one."""
    from benchmarks.launches import KernelCount
    from benchmarks.peers import build_peer
    from muonq_hf import kernels, precision

    counts = {}
    compiling = kernels.compile_enabled()
    kernels.set_compile(False)
    precision.set_bf16_emulation(False)
    try:
        for row in ("torch_muon", "groups", "one_by_one"):
            model = gpt2(layers=12)
            for p in model.parameters():
                p.grad = torch.randn_like(p)
            if row == "torch_muon":
                opt = build_peer("torch_muon", model, 0.02, 0.0)
            else:
                opt = MuonQ(param_groups(model), lr=0.02, batch_elements=BATCH if row == "groups" else 0)
            opt.step()
            opt.step()
            with KernelCount() as launches:
                opt.step()
            counts[row] = launches.count
    finally:
        kernels.set_compile(compiling)
        precision.set_bf16_emulation(None)
    assert counts["groups"] <= counts["torch_muon"], counts
    assert counts["one_by_one"] > 5 * counts["groups"], counts


def test_ddp_state_sharding_batches_the_matrices_each_rank_owns(tmp_path):
    """2 ranks, ddp_shard_state: each rank runs the batches of the matrices it owns (both ranks have some) and
    broadcasts; weights and the full state equal replicated DDP stepping one matrix at a time, bit for bit."""
    run_two_ranks("ddp_batch_worker.py", env=worker_env(BATCH_OUT=str(tmp_path)))
    res = json.loads((tmp_path / "ddp_batch.json").read_text())
    assert res["difference"] is None, res["difference"]
    assert all(sizes and max(sizes) >= 2 for sizes in res["batch_sizes"]), res["batch_sizes"]


def test_a_shape_group_keeps_its_state_in_one_bank_and_honours_a_replaced_entry():
    """The members' state entries are views of one stacked tensor per entry (no copy per step); an entry a user
    replaces is read at the next step (the bank stacks the members again): the same weights as the same edit
    under one-by-one steps."""
    models = [gpt2(), gpt2()]
    opts = [MuonQ(param_groups(m), lr=0.02, batch_elements=b) for m, b in zip(models, (BATCH, 0), strict=True)]
    fc = [m.transformer.h[0].mlp.c_fc.weight for m in models]
    for step in range(3):
        for m, opt, p in zip(models, opts, fc, strict=True):
            ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(step))
            m(input_ids=ids, labels=ids).loss.backward()
            if step == 2:  # a user halves one matrix's stored residual scale
                opt.state[p]["res_scale"] = opt.state[p]["res_scale"] / 2
            opt.step()
            opt.zero_grad(set_to_none=True)
        if step == 1:  # batched: the three layers' c_fc codes share one storage, member by member
            codes = [opts[0].state[m.mlp.c_fc.weight]["res_codes"] for m in models[0].transformer.h]
            base = codes[0].untyped_storage().data_ptr()
            assert all(c.untyped_storage().data_ptr() == base for c in codes)
            assert [c.storage_offset() for c in codes] == [i * codes[0].numel() for i in range(3)]
    assert_same(*models, *opts)
