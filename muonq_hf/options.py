"""MuonQ's options: defaults, the rule each value must meet, and the ``--optim_args`` parser.

Every option reaches MuonQ through a param group (constructor arguments are the defaults of every group), so
``validate_group`` is the one check: the constructor, every group, ``--optim_args`` (after casting) and
``DeepSpeedMuonQ`` all pass through it. Types are exact (a bool is not a number, a string is not a bool),
numbers are finite, and the error names the option, the value and what is allowed.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import torch

MUON_DEFAULTS: dict[str, Any] = dict(
    momentum=0.95,  # beta of the momentum M = beta * M + G
    nesterov=False,  # U = NS(G + beta * M) instead of NS(M)
    ns_steps=5,  # Newton-Schulz iterations (Keller's quintic)
    ns_dtype="bf16",  # dtype of the Newton-Schulz iteration: "bf16" (as every peer runs it) or "fp32"
    ns_coefficients="quintic",  # Keller Jordan's quintic (the paper's) or Polar Express's per-iteration ones
    bits=4,  # momentum storage: 4 or 8 bit codes, or 32 = fp32 (no codec)
    normalize=True,  # pre-quantization normalization of G and of M (the paper's technique 1)
    rank_divisor=16,  # low-rank split rank r = min(m, n) // rank_divisor; 0 = no split (technique 2)
    mu=255.0,  # mu-law companding strength; 0 = linear codec (technique 3)
    block_size=None,  # None: one residual scale per matrix; int: scales per block of columns in each row
    stochastic_rounding=False,  # round codes stochastically (unbiased) instead of to nearest
    store_norm=False,  # keep ||M|| (4 bytes per matrix): "quantized standard Muon", docs/design.md
    qkv_split=1,  # split a fused QKV matrix into this many pieces, each quantized and orthogonalized alone
    split_dim=0,  # axis of the (m, n) view along which qkv_split cuts: 0 for nn.Linear, 1 for HF Conv1D
    piece_sizes=None,  # explicit piece sizes along split_dim (fused QKV under grouped-query attention)
    interleave=False,  # pieces alternate column by column (GPT-OSS expert gate_up)
    experts=False,  # True: dim 0 stacks independent matrices (MoE experts); an int g: g groups (grouped conv)
)
ADAMW_DEFAULTS: dict[str, Any] = dict(
    betas=(0.9, 0.95),
    eps=1e-8,
    adamw_bits=32,  # 32: fp32 m and v; 8: blockwise (256) dynamic 8-bit m and v for tensors >= 4096 elements
    adamw_lr=None,  # if set, the lr of the AdamW groups (by default one lr serves both: RMS-matched update)
)
COMMON_DEFAULTS: dict[str, Any] = dict(
    lr=0.02,
    weight_decay=0.0,
    use_muon=False,
    seed=0,  # seeds the first-step Gaussian of the power iteration and stochastic rounding
    weight_update="nearest",  # how bf16/fp16 weights take their change: "nearest", "stochastic", "kahan" (weights.py)
)

DEFAULTS: dict[str, Any] = {**COMMON_DEFAULTS, **MUON_DEFAULTS, **ADAMW_DEFAULTS}  # every option's default


# ------------------------------------------------------------------------------------------ validation
def _is_real(v: Any) -> bool:
    """A plain number (not a bool, not a string) or a one-element floating tensor (torch accepts tensor lrs)."""
    if isinstance(v, torch.Tensor):
        return v.numel() == 1 and v.is_floating_point()
    return isinstance(v, numbers.Real) and not isinstance(v, bool)  # numpy scalars (np.float32) are reals too


def _finite_at_least(low: float) -> Callable[[Any], bool]:
    return lambda v: _is_real(v) and math.isfinite(float(v)) and float(v) >= low


def _in_unit(v: Any) -> bool:  # [0, 1)
    return _is_real(v) and math.isfinite(float(v)) and 0 <= float(v) < 1


def _int_at_least(low: int, high: int | None = None) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low and (high is None or v <= high)


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _one_of(*allowed: Any) -> Callable[[Any], bool]:
    return lambda v: type(v) is type(allowed[0]) and v in allowed


def _piece_sizes(v: Any) -> bool:
    return v is None or (isinstance(v, (list, tuple)) and len(v) > 0 and all(_int_at_least(1)(s) for s in v))


def _betas(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and len(v) == 2 and all(_in_unit(b) for b in v)


def _experts(v: Any) -> bool:
    return isinstance(v, bool) or _int_at_least(1)(v)


# option -> (check, what is allowed); every key of the defaults has a rule
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "lr": (_finite_at_least(0), "a finite number >= 0"),
    "weight_decay": (_finite_at_least(0), "a finite number >= 0"),
    "use_muon": (_is_bool, "True or False"),
    "seed": (_int_at_least(0), "an int >= 0"),
    "weight_update": (_one_of("nearest", "stochastic", "kahan"), "'nearest', 'stochastic' or 'kahan'"),
    "momentum": (_in_unit, "a finite number in [0, 1)"),
    "nesterov": (_is_bool, "True or False"),
    "ns_steps": (_int_at_least(1, 100), "an int in [1, 100]"),
    "ns_dtype": (_one_of("bf16", "fp32"), "'bf16' or 'fp32'"),
    "ns_coefficients": (_one_of("quintic", "polar_express"), "'quintic' or 'polar_express'"),
    "bits": (_one_of(4, 8, 32), "one of 4, 8, 32"),
    "normalize": (_is_bool, "True or False"),
    "rank_divisor": (_int_at_least(0), "an int >= 0 (0 = no low-rank split)"),
    "mu": (_finite_at_least(0), "a finite number >= 0 (0 = linear codec)"),
    "block_size": (lambda v: v is None or _int_at_least(1)(v), "None (one scale per matrix) or an int >= 1"),
    "stochastic_rounding": (_is_bool, "True or False"),
    "store_norm": (_is_bool, "True or False"),
    "qkv_split": (_int_at_least(1), "an int >= 1"),
    "split_dim": (_one_of(0, 1), "0 (rows) or 1 (columns)"),
    "piece_sizes": (_piece_sizes, "None or a list of ints >= 1 (sizes of the pieces along split_dim)"),
    "interleave": (_is_bool, "True or False"),
    "experts": (_experts, "True (dim 0 stacks expert matrices), False, or an int >= 1 (groups of a grouped conv)"),
    "betas": (_betas, "two finite numbers in [0, 1)"),
    "eps": (_finite_at_least(0), "a finite number >= 0"),
    "adamw_bits": (_one_of(8, 32), "8 or 32"),
    "adamw_lr": (lambda v: v is None or _finite_at_least(0)(v), "None or a finite number >= 0"),
}
assert set(RULES) == set(DEFAULTS), "every option needs a rule"


def option_error(name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"MuonQ: {name}={value!r} is not allowed; {name} must be {allowed}")


def validate_group(group: dict) -> None:
    """Raise ValueError naming the first option of ``group`` whose value breaks its rule."""
    for name, (check, allowed) in RULES.items():
        if name in group and not check(group[name]):
            raise option_error(name, group[name], allowed)


# ------------------------------------------------------------------------------------------ optim_args

# --optim_args keys: every MuonQ option that TrainingArguments does not already own, with its type.
# lr, betas, eps and weight_decay come from --learning_rate, --adam_beta1/2, --adam_epsilon, --weight_decay;
# qkv_split/split_dim are per-parameter and set by param_groups (split_qkv switches that off).
_TYPES: dict[str, str] = {
    "momentum": "float",
    "nesterov": "bool",
    "ns_steps": "int",
    "ns_dtype": "str",
    "ns_coefficients": "str",
    "bits": "int",
    "normalize": "bool",
    "rank_divisor": "int",
    "mu": "float",
    "block_size": "int|none",
    "stochastic_rounding": "bool",
    "store_norm": "bool",
    "adamw_bits": "int",
    "adamw_lr": "float|none",
    "seed": "int",
    "weight_update": "str",
    "nonfinite": "str",
    "cuda_graph": "bool",
    "split_qkv": "bool",
    "adamw_names": "patterns",  # ';'-separated name patterns moved to AdamW, e.g. classifier.*;score.*
    "muon_names": "patterns",  # ';'-separated name patterns moved to Muon
}
OPTIM_ARGS_DEFAULTS: dict[str, Any] = {
    **{k: v for k, v in MUON_DEFAULTS.items() if k in _TYPES},
    **{k: v for k, v in ADAMW_DEFAULTS.items() if k in _TYPES},
    "seed": None,  # None: TrainingArguments.seed
    "weight_update": "nearest",
    "nonfinite": "error",
    "cuda_graph": False,
    "split_qkv": True,
    "adamw_names": "",
    "muon_names": "",
}
assert set(OPTIM_ARGS_DEFAULTS) == set(_TYPES), "every --optim_args key needs a type and a default"
_OWNED_BY_TRAINING_ARGS = {
    "lr": "--learning_rate",
    "betas": "--adam_beta1 / --adam_beta2",
    "eps": "--adam_epsilon",
    "weight_decay": "--weight_decay",
}
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _cast(key: str, text: str) -> Any:
    kind = _TYPES[key]
    low = text.strip().lower()
    if kind.endswith("|none") and low == "none":
        return None
    try:
        if kind == "bool":
            if low in _TRUE or low in _FALSE:
                return low in _TRUE
            raise ValueError
        if kind.startswith("int"):
            return int(text)
        if kind.startswith("float"):
            return float(text)
    except ValueError:
        expected = {"bool": "true/false (or 1/0, yes/no)", "int": "an integer", "float": "a number"}
        detail = expected[kind.split("|")[0]] + (" or none" if kind.endswith("|none") else "")
        raise ValueError(f"--optim_args: {key}={text!r} is not valid; {key} must be {detail}") from None
    return text.strip()


def parse_optim_args(optim_args: str | None) -> dict[str, Any]:
    """Parse ``--optim_args "bits=4,rank_divisor=16"`` into typed MuonQ options.

    Values are cast to the option's type (bool: true/false/1/0/yes/no; ``none`` for optional values). Unknown
    or repeated keys raise ValueError naming the key and listing the allowed ones; keys that TrainingArguments
    owns (lr, betas, eps, weight_decay) point to the flag to use instead. Ranges are checked by MuonQ.
    """
    options: dict[str, Any] = {}
    if not optim_args or not optim_args.strip():
        return options
    for item in optim_args.split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise ValueError(f"--optim_args: {item.strip()!r} is not key=value; expected e.g. 'bits=4,rank_divisor=16'")
        key, value = (s.strip() for s in item.split("=", 1))
        if key in _OWNED_BY_TRAINING_ARGS:
            raise ValueError(
                f"--optim_args: {key!r} is set by the TrainingArguments flag {_OWNED_BY_TRAINING_ARGS[key]}, "
                "not by --optim_args"
            )
        if key not in _TYPES:
            raise ValueError(f"--optim_args: unknown MuonQ option {key!r}; allowed: {', '.join(sorted(_TYPES))}")
        if key in options:
            raise ValueError(f"--optim_args: option {key!r} is given twice")
        options[key] = _cast(key, value)
    return options
