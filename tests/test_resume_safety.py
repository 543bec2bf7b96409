"""Loading a checkpoint: refusals name parameter and entry and change nothing; changed storage options convert
the saved state (equal to a direct re-encode); unchanged options stay bit-exact (tests/test_checkpoint.py)."""

import copy
import logging

import pytest
import torch
from torch import nn

from muonq_hf import MuonQ, param_groups
from muonq_hf.checkpoint import CheckpointError, encode_momentum
from muonq_hf.matrices import plan_of
from muonq_hf.state import QuantizedMomentum


class Net(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(300, 16)  # 4800 elements: takes the 8-bit AdamW path with adamw_bits=8
        self.fc = nn.Linear(16, width)
        self.qkv_proj = nn.Linear(16, 48, bias=False)  # three (16, 16) pieces with split_qkv
        self.out = nn.Linear(width, 16)

    def forward(self, ids):
        h = self.emb(ids)
        q, k, v = self.qkv_proj(h).chunk(3, -1)
        return self.out(torch.tanh(self.fc(h + q * k + v))).pow(2).mean()


def trained(options: dict | None = None, steps: int = 3, width: int = 16, **route):
    torch.manual_seed(0)
    model = Net(width)
    opt = MuonQ(param_groups(model, **route), lr=0.01, **(options or {}))
    for step in range(steps):
        model(torch.randint(0, 300, (4, 8), generator=torch.Generator().manual_seed(step))).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def snapshot(opt):
    return {i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(
        p for g in opt.param_groups for p in g["params"])}


def assert_unchanged(opt, before):
    after = snapshot(opt)
    assert after.keys() == before.keys()
    for i in before:
        assert all(torch.equal(before[i][k], after[i][k]) for k in before[i]), f"state of parameter {i} changed"


def test_state_of_other_shapes_is_refused_by_name_and_nothing_changes():
    _, saved = trained(width=48)
    model, opt = trained(width=40)
    before, weights = snapshot(opt), [p.detach().clone() for p in model.parameters()]
    with pytest.raises(CheckpointError, match=r"parameter 0 of group 0 of shape \(40, 16\): state entry 'res_codes' "
                                              r"is torch.uint8 \(48, 8\), expected torch.uint8 \(40, 8\)"):
        opt.load_state_dict(saved.state_dict())
    assert_unchanged(opt, before)
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))


def test_parameter_names_are_used_when_the_groups_carry_them():
    _, saved = trained(width=48)
    torch.manual_seed(0)
    model = Net(40)
    groups = param_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        g["param_names"] = [names[id(p)] for p in g["params"]]
    opt = MuonQ(groups, lr=0.01)
    sd = saved.state_dict()
    for g in sd["param_groups"]:
        g["param_names"] = ["?"] * len(g["params"])
    with pytest.raises(CheckpointError, match=r"parameter fc.weight of shape \(40, 16\)"):
        opt.load_state_dict(sd)


def test_torch_adamw_state_is_not_a_muonq_checkpoint():
    model, opt = trained()
    adamw = torch.optim.AdamW(model.parameters())
    model(torch.randint(0, 300, (2, 4))).backward()
    adamw.step()
    with pytest.raises(CheckpointError, match="param group 0 of the checkpoint has no 'use_muon': it was not saved "
                                              r"by MuonQ \(e.g. torch.optim.AdamW\)"):
        opt.load_state_dict(adamw.state_dict())


def adamw_entry(sd):
    return next(s for s in sd["state"].values() if "exp_avg_sq" in s)


CORRUPT = "the checkpoint is corrupt"


@pytest.mark.parametrize("corrupt,match", [
    (lambda sd: sd["param_groups"][0].update(bits=5), r"param group 0 of the checkpoint: MuonQ: bits=5 is not allowed"),
    (lambda sd: sd["state"][1]["res_scale"].fill_(float("nan")), f"'res_scale' holds non-finite values: {CORRUPT}"),
    (lambda sd: adamw_entry(sd)["exp_avg_sq"].view(-1)[:3].fill_(-1.0), f"'exp_avg_sq' holds negative values: {CORRUPT}"
     ),
    (lambda sd: sd["state"][1].pop("R_codes"), r"entries do not match \(missing \['R_codes'\], unexpected \[\]\)"),
    (lambda sd: sd["state"][1].update(res_codes=sd["state"][1]["res_codes"].float()), "'res_codes' is torch.float32"),
    (lambda sd: sd["param_groups"][1].update(use_muon=False), "param group 1 is Muon here but AdamW in the checkpoint"),
])
def test_corrupt_or_mismatched_checkpoints_are_refused(corrupt, match):
    _, opt = trained()
    sd = copy.deepcopy(opt.state_dict())
    corrupt(sd)
    _, fresh = trained(steps=1)
    before = snapshot(fresh)
    with pytest.raises(CheckpointError, match=match):
        fresh.load_state_dict(sd)
    assert_unchanged(fresh, before)


def direct_reencode(opt_saved, opt_now, p_saved, p_now, index):
    """The conversion's reference: decode with the saved options, encode with the new ones (public functions)."""
    g_saved = next(g for g in opt_saved.param_groups if any(q is p_saved for q in g["params"]))
    g_now = next(g for g in opt_now.param_groups if any(q is p_now for q in g["params"]))
    M = QuantizedMomentum(plan_of(p_saved, g_saved), g_saved).dequantized(opt_saved.state[p_saved])
    plan = plan_of(p_now, g_now)
    out = {"step": opt_saved.state[p_saved]["step"]}
    encode_momentum(plan.view(M.reshape(p_now.shape)), out, plan, g_now, index)
    return out


@pytest.mark.parametrize("new", [dict(bits=8), dict(rank_divisor=0), dict(block_size=4), dict(bits=32),
                                 dict(store_norm=True), dict(mu=0.0)])
def test_changed_storage_options_convert_the_state(new, caplog):
    model, opt = trained()
    sd = opt.state_dict()
    torch.manual_seed(0)
    model2 = Net()
    model2.load_state_dict(model.state_dict())
    opt2 = MuonQ(param_groups(model2), lr=0.01, **new)
    with caplog.at_level(logging.WARNING, logger="transformers.muonq_hf"):
        opt2.load_state_dict(sd)
    option = next(iter(new))
    assert any(f"{option} " in r.getMessage() and "converted" in r.getMessage() for r in caplog.records)
    assert all(g[option] == new[option] for g in opt2.param_groups if g["use_muon"])
    index = 0
    for g_saved, g_now in zip(opt.param_groups, opt2.param_groups, strict=True):
        for p, q in zip(g_saved["params"], g_now["params"], strict=True):
            if g_now["use_muon"]:
                ref = direct_reencode(opt, opt2, p, q, index)
                got = opt2.state[q]
                assert got.keys() == ref.keys(), (sorted(got), sorted(ref))
                for k in ref:
                    assert torch.equal(got[k], ref[k]), f"{option}: parameter {index} entry {k}"
            index += 1
    model2(torch.randint(0, 300, (4, 8))).backward()
    opt2.step()  # the converted state steps with the new options
    assert all(torch.isfinite(p).all() for p in model2.parameters())


def test_changed_plan_and_adamw_bits_convert_too():
    model, opt = trained(split_qkv=False)
    torch.manual_seed(0)
    model2 = Net()
    model2.load_state_dict(model.state_dict())
    opt2 = MuonQ(param_groups(model2, split_qkv=False), lr=0.01, adamw_bits=8)
    opt2.load_state_dict(opt.state_dict())
    emb_state = opt2.state[model2.emb.weight]
    assert emb_state["exp_avg_codes"].dtype == torch.uint8
    ref = opt.state[model.emb.weight]["exp_avg"]
    from muonq_hf.codecs import dequantize_dynamic8, dynamic_codebook

    back = dequantize_dynamic8(emb_state["exp_avg_codes"], emb_state["exp_avg_absmax"], dynamic_codebook(True))
    assert (back.view_as(ref) - ref).abs().max() <= 0.02 * ref.abs().max()  # 8-bit dynamic codes of the moment


def test_changed_matrix_plan_converts_and_a_changed_group_count_is_refused():
    """qkv_proj saved as one (48, 16) matrix, loaded as three (16, 16) pieces: the plan's state is re-encoded."""
    def groups(model, k):
        return [dict(params=[model.fc.weight, model.out.weight], use_muon=True),
                dict(params=[model.qkv_proj.weight], use_muon=True, qkv_split=k),
                dict(params=[model.emb.weight, model.fc.bias, model.out.bias], use_muon=False)]

    torch.manual_seed(0)
    model = Net()
    opt = MuonQ(groups(model, 1), lr=0.01)
    model(torch.randint(0, 300, (4, 8))).backward()
    opt.step()
    opt2 = MuonQ(groups(model, 3), lr=0.01)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.param_groups[1]["qkv_split"] == 3
    ref = direct_reencode(opt, opt2, model.qkv_proj.weight, model.qkv_proj.weight, 2)
    assert all(torch.equal(opt2.state[model.qkv_proj.weight][k], v) for k, v in ref.items())
    assert opt2.state[model.qkv_proj.weight]["res_scale"].shape == (3,)  # one scale per piece now
    with pytest.raises(CheckpointError, match="the checkpoint has 3 param groups, this optimizer 4"):
        MuonQ(param_groups(model), lr=0.01).load_state_dict(opt.state_dict())


def test_skipped_steps_are_saved_and_restored():
    model, opt = trained(dict(nonfinite="skip"))
    model.fc.weight.grad = torch.full_like(model.fc.weight, float("nan"))
    opt.step()
    assert opt.skipped_steps == 1
    _, fresh = trained(dict(nonfinite="skip"), steps=1)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.skipped_steps == 1


def test_converting_sharded_state_is_refused_with_the_option_named():
    _, opt = trained()
    torch.manual_seed(0)
    model2 = Net()
    opt2 = MuonQ(param_groups(model2), lr=0.01, bits=8, ddp_shard_state=True)
    with pytest.raises(CheckpointError, match=r"bits is 4 in the checkpoint and 8 now; converting a sharded"):
        opt2.load_state_dict(opt.state_dict())


def test_trainer_resume_with_new_optim_args_converts_to_them(tmp_path):
    """`--optim_args bits=8` at resume used to be ignored (the run went on with the checkpoint's bits=4)."""
    from tiny_hf import train_tiny
    from transformers import TrainingArguments

    def args(optim_args):
        return TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", optim="muonq",
                                 optim_args=optim_args, learning_rate=0.01, max_steps=4, per_device_train_batch_size=4,
                                 save_strategy="steps", save_steps=2, disable_tqdm=True, seed=0)

    train_tiny(args("bits=4"), dropout=0.0)
    resumed = train_tiny(args("bits=8"), dropout=0.0, resume=str(tmp_path / "checkpoint-2"))
    opt = getattr(resumed.optimizer, "optimizer", resumed.optimizer)
    muon = [g for g in opt.param_groups if g["use_muon"]]
    assert muon and all(g["bits"] == 8 for g in muon)
    for g in muon:
        for p in g["params"]:
            plan = plan_of(p, g)
            widths = [plan.piece_shape(j)[1] for j in range(plan.k)]  # 8-bit: one byte per column
            assert opt.state[p]["res_codes"].shape[-1] == plan.row_width(widths)
    saved = torch.load(tmp_path / "checkpoint-4" / "optimizer.pt", weights_only=True)
    assert all(g["bits"] == 8 for g in saved["param_groups"] if g["use_muon"])


def test_changing_a_storage_option_after_loading_converts_at_the_next_step(caplog):
    """It used to crash with `The size of tensor a (8) must match the size of tensor b (16)`."""
    model, opt = trained()
    torch.manual_seed(0)
    model2 = Net()
    model2.load_state_dict(model.state_dict())
    opt2 = MuonQ(param_groups(model2), lr=0.01)
    opt2.load_state_dict(opt.state_dict())
    for group in opt2.param_groups:
        group["bits"] = 8
    with caplog.at_level(logging.WARNING, logger="transformers.muonq_hf"):
        model2(torch.randint(0, 300, (4, 8))).backward()
        opt2.step()
    assert any("storage options changed in param_groups" in r.getMessage() for r in caplog.records)
    assert opt2.state[model2.fc.weight]["res_codes"].shape == (16, 16)  # 8-bit: one byte per column
    assert all(torch.isfinite(p).all() for p in model2.parameters())


def test_checkpoint_older_than_an_option_resumes_with_the_value_given_now():
    """A checkpoint written before ns_dtype existed has no such key in its groups (torch's loader keeps only the
    saved group's keys): the group takes the value given now, and the state resumes bit for bit."""
    model, opt = trained()
    sd = copy.deepcopy(opt.state_dict())
    for group in sd["param_groups"]:
        del group["ns_dtype"]
    fresh_model, fresh = trained(dict(ns_dtype="fp32"), steps=0)
    fresh_model.load_state_dict(model.state_dict())
    fresh.load_state_dict(sd)
    assert [g["ns_dtype"] for g in fresh.param_groups] == ["fp32"] * len(fresh.param_groups)
    ids = torch.randint(0, 300, (4, 8), generator=torch.Generator().manual_seed(9))
    for m, o in ((model, opt), (fresh_model, fresh)):
        m(ids).backward()
        o.step()  # fresh: a KeyError here before, the loaded groups lacked the option
    for i, (p, q) in enumerate(zip(opt.state, fresh.state, strict=True)):  # the momentum does not depend on NS
        assert int(fresh.state[q]["step"]) == 4, i
        assert all(torch.equal(opt.state[p][k], fresh.state[q][k]) for k in opt.state[p]), i
