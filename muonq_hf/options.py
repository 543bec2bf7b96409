"""``--optim_args`` for MuonQ: the keys, their types and defaults, and the parser (Trainer and routing report)."""

from __future__ import annotations

from typing import Any

from .optimizer import ADAMW_DEFAULTS, MUON_DEFAULTS

# --optim_args keys: every MuonQ option that TrainingArguments does not already own, with its type.
# lr, betas, eps and weight_decay come from --learning_rate, --adam_beta1/2, --adam_epsilon, --weight_decay;
# qkv_split/split_dim are per-parameter and set by param_groups (split_qkv switches that off).
_TYPES: dict[str, str] = {
    "momentum": "float",
    "nesterov": "bool",
    "ns_steps": "int",
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
    "nonfinite": "str",
    "split_qkv": "bool",
    "adamw_names": "patterns",  # ';'-separated name patterns moved to AdamW, e.g. classifier.*;score.*
    "muon_names": "patterns",  # ';'-separated name patterns moved to Muon
}
OPTIM_ARGS_DEFAULTS: dict[str, Any] = {
    **{k: v for k, v in MUON_DEFAULTS.items() if k in _TYPES},
    **{k: v for k, v in ADAMW_DEFAULTS.items() if k in _TYPES},
    "seed": None,  # None: TrainingArguments.seed
    "nonfinite": "error",
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
