"""Registration of --optim muonq with transformers: enum, parser, pickle/JSON, handler table, 4.x path, optim_args."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from tiny_hf import tiny_model
from transformers import HfArgumentParser, TrainingArguments
from transformers.trainer_optimizer import _OPTIMIZER_HANDLERS
from transformers.training_args import OptimizerNames

import muonq_hf
from muonq_hf import MuonQ, hf
from muonq_hf import options as options_module

PY = sys.executable


def _args(tmp_path: Path, **kw) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", optim="muonq", **kw)


def test_import_registers_enum_and_handler_idempotently():
    assert OptimizerNames("muonq") is OptimizerNames.MUONQ
    assert "muonq" in [o.value for o in OptimizerNames]
    assert _OPTIMIZER_HANDLERS[OptimizerNames.MUONQ] is hf.muonq_handler
    n_members, n_handlers = len(OptimizerNames), len(_OPTIMIZER_HANDLERS)
    muonq_hf.register()
    hf._patch_training_args(sys.modules["transformers.training_args"])  # the hooks themselves are idempotent
    hf._patch_handler_table(sys.modules["transformers.trainer_optimizer"])
    assert (len(OptimizerNames), len(_OPTIMIZER_HANDLERS)) == (n_members, n_handlers)
    assert hf.is_registered()
    assert "muon" not in OptimizerNames._value2member_map_  # no alias: that name is left to transformers


def test_parser_accepts_muonq_and_lists_it_in_help(tmp_path):
    parser = HfArgumentParser(TrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--optim", "muonq", "--optim_args", "bits=8,rank_divisor=8"]
    )
    assert args.optim is OptimizerNames.MUONQ and args.optim_args == "bits=8,rank_divisor=8"
    optim_help = parser.format_help().split("--optim ", 1)[1].split("--optim_args", 1)[0]
    assert "muonq" in optim_help and "adamw_torch" in optim_help
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--optim", "muonq_nope"])


def test_training_args_pickle_and_json_round_trip(tmp_path):
    args = _args(tmp_path, optim_args="bits=4,adamw_bits=8")
    back = pickle.loads(pickle.dumps(args))
    assert back.optim is OptimizerNames.MUONQ and back.optim_args == "bits=4,adamw_bits=8"
    as_dict = json.loads(args.to_json_string())
    assert as_dict["optim"] == "muonq"
    assert TrainingArguments(**as_dict).optim is OptimizerNames.MUONQ


def test_lazy_registration_and_training_args_bin_in_fresh_interpreters(tmp_path):
    """`import muonq_hf` imports no transformers, yet a later import sees muonq; without it the pickle fails."""
    path = tmp_path / "training_args.bin"
    torch.save(_args(tmp_path), path)
    load = f"import torch; a = torch.load({str(path)!r}, weights_only=False); print('LOADED', a.optim.value)"
    lazy = f"import sys, muonq_hf; assert 'transformers' not in sys.modules, 'transformers imported'; {load}"
    out = subprocess.run([PY, "-c", lazy], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "LOADED muonq" in out.stdout, out.stderr[-2000:]
    bare = subprocess.run([PY, "-c", load], capture_output=True, text=True, timeout=120)
    assert bare.returncode != 0 and "muonq is not a valid OptimizerNames" in bare.stderr, bare.stderr[-2000:]


# --------------------------------------------------------------------------------------- building MuonQ
def test_trainer_builds_muonq_with_split_groups_and_training_args(tmp_path):
    from transformers import Trainer

    args = _args(tmp_path, learning_rate=3e-3, weight_decay=0.1, adam_beta1=0.8, adam_beta2=0.9, adam_epsilon=1e-6,
                 seed=7, optim_args="bits=8, adamw_lr=1e-3, normalize=false, block_size=none")
    model = tiny_model()
    optimizer = Trainer(model=model, args=args).create_optimizer()
    assert isinstance(optimizer, MuonQ)
    names = {id(p): n for n, p in model.named_parameters()}
    by_name = {names[id(p)]: g for g in optimizer.param_groups for p in g["params"]}
    assert len(by_name) == len(names)  # every parameter exactly once (wte/lm_head tied: one tensor)
    for name, group in by_name.items():
        assert (group["bits"], group["normalize"], group["block_size"], group["seed"]) == (8, False, None, 7)
        assert group["betas"] == (0.8, 0.9) and group["eps"] == 1e-6
        matrix = name.endswith("weight") and ".h." in name and ".ln_" not in name
        assert group["use_muon"] is matrix, name
        assert group["lr"] == (3e-3 if matrix else 1e-3), name
        no_decay = name.endswith("bias") or "ln_" in name
        assert group["weight_decay"] == (0.0 if no_decay else 0.1), name
    c_attn = by_name["transformer.h.0.attn.c_attn.weight"]
    assert (c_attn["qkv_split"], c_attn["split_dim"]) == (3, 1)  # GPT-2's fused Conv1D QKV, split in three


def test_legacy_4x_path_wraps_get_optimizer_cls_and_kwargs(tmp_path, monkeypatch):
    """transformers 4.x has no handler table: the static Trainer method is wrapped (fake Trainer class)."""

    class FakeTrainer:
        @staticmethod
        def get_optimizer_cls_and_kwargs(args, model=None):
            if args.optim == "adamw_torch":
                return torch.optim.AdamW, {"lr": args.learning_rate}
            raise ValueError(f"Trainer cannot instantiate unsupported optimizer: {args.optim}")

    module = types.SimpleNamespace(Trainer=FakeTrainer)
    monkeypatch.setattr(hf, "_has_handler_table", lambda: False)
    hf._patch_trainer(module)
    hf._patch_trainer(module)  # idempotent: wrapped once
    assert FakeTrainer.get_optimizer_cls_and_kwargs._muonq_patched
    cls, kwargs = FakeTrainer.get_optimizer_cls_and_kwargs(_args(tmp_path, learning_rate=0.05), tiny_model())
    assert cls is MuonQ and kwargs["lr"] == 0.05
    optimizer = cls(kwargs.pop("params"), **kwargs)
    assert sum(g["use_muon"] for g in optimizer.param_groups) >= 1
    other = types.SimpleNamespace(optim="adamw_torch", learning_rate=0.1)
    assert FakeTrainer.get_optimizer_cls_and_kwargs(other) == (torch.optim.AdamW, {"lr": 0.1})
    with pytest.raises(ValueError, match="unsupported optimizer: sgd_nope"):
        FakeTrainer.get_optimizer_cls_and_kwargs(types.SimpleNamespace(optim="sgd_nope"))


def test_existing_names_and_handlers_are_never_replaced():
    from transformers.utils import ExplicitEnum

    class Names(ExplicitEnum):
        OTHER = "muonq"

    with pytest.raises(RuntimeError, match="already has 'muonq' as OTHER"):
        hf._add_enum_member(Names, "MUONQ", "muonq")
    foreign = types.SimpleNamespace(_OPTIMIZER_HANDLERS={"muonq": lambda ctx: None}, OptimizerNames=OptimizerNames)
    with pytest.raises(RuntimeError, match="already has an optimizer handler for 'muonq'"):
        hf._patch_handler_table(foreign)


# --------------------------------------------------------------------------------------------- optim_args
def test_optim_args_are_cast_to_their_types():
    options = hf.parse_optim_args(
        "bits=4, rank_divisor=16 ,adamw_bits=8,mu=0,normalize=False,nesterov=1,store_norm=yes,"
        "block_size=128,adamw_lr=none,stochastic_rounding=off,seed=3,nonfinite=skip,split_qkv=false,momentum=0.9"
    )
    assert options == dict(
        bits=4, rank_divisor=16, adamw_bits=8, mu=0.0, normalize=False, nesterov=True, store_norm=True,
        block_size=128, adamw_lr=None, stochastic_rounding=False, seed=3, nonfinite="skip", split_qkv=False,
        momentum=0.9,
    )
    assert type(options["mu"]) is float and type(options["bits"]) is int
    assert hf.parse_optim_args(None) == {} and hf.parse_optim_args("") == {}
    assert set(options_module.OPTIM_ARGS_DEFAULTS) == set(options_module._TYPES)


@pytest.mark.parametrize(
    "text, message",
    [
        ("bitz=4", r"unknown MuonQ option 'bitz'; allowed: adamw_bits, adamw_lr, adamw_names, bits, .*split_qkv"),
        ("bits=four", r"bits='four' is not valid; bits must be an integer"),
        ("normalize=maybe", r"normalize='maybe' is not valid; normalize must be true/false"),
        ("block_size=wide", r"block_size='wide' is not valid; block_size must be an integer or none"),
        ("mu=x", r"mu='x' is not valid; mu must be a number"),
        ("lr=0.1", r"'lr' is set by the TrainingArguments flag --learning_rate"),
        ("betas=0.9", r"'betas' is set by the TrainingArguments flag --adam_beta1 / --adam_beta2"),
        ("weight_decay=0.1", r"--weight_decay"),
        ("bits=4,bits=8", r"option 'bits' is given twice"),
        ("bits", r"'bits' is not key=value"),
    ],
)
def test_optim_args_errors_name_the_value_and_what_is_allowed(text, message):
    with pytest.raises(ValueError, match=message):
        hf.parse_optim_args(text)


def test_out_of_range_option_fails_when_the_trainer_builds_the_optimizer(tmp_path):
    from transformers import Trainer

    trainer = Trainer(model=tiny_model(), args=_args(tmp_path, optim_args="bits=5"))
    with pytest.raises(ValueError, match=r"bits=5 is not allowed; bits must be one of 4, 8, 32"):
        trainer.create_optimizer()
