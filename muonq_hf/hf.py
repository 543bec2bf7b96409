"""Hugging Face integration: ``--optim muonq`` for ``TrainingArguments``, ``HfArgumentParser`` and ``Trainer``.

``import muonq_hf`` calls :func:`register`, which is cheap: it does not import transformers. It installs
post-import hooks that patch transformers the moment the relevant modules load (or at once if they already
have):

* ``transformers.training_args``: adds ``OptimizerNames.MUONQ = "muonq"`` to the enum, so
  ``TrainingArguments(optim="muonq")`` validates, pickles (``training_args.bin``) and round-trips through JSON,
  and ``HfArgumentParser`` offers it as a choice (choices are read from the enum when a parser is built).
* transformers >= 5.2 (feature-detected: ``transformers.trainer_optimizer._OPTIMIZER_HANDLERS`` exists):
  adds :func:`muonq_handler` to that table.
* older 4.x (no handler table): wraps the static ``Trainer.get_optimizer_cls_and_kwargs`` so that ``muonq``
  is answered here and every other name goes to the original method.

Every step is idempotent and checks what it finds: a name already taken by transformers is never replaced.
"""

from __future__ import annotations

import dataclasses
import importlib.abc
import importlib.machinery
import logging
import re
import sys
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

from .backends import check_model
from .deepspeed import trainer_optimizer_cls
from .grouping import Route, groups_from_routes, route
from .optimizer import MuonQ
from .options import OPTIM_ARGS_DEFAULTS, parse_optim_args
from .plan import routing_summary

__all__ = ["OPTIM_ARGS_DEFAULTS", "OPTIM_NAME", "optimizer_cls_and_kwargs", "parse_optim_args", "register"]
# A child of transformers' root logger: the routing summary follows the Trainer's --log_level like its own info lines
logger = logging.getLogger("transformers.muonq_hf")

OPTIM_NAME = "muonq"
ENUM_NAME = "MUONQ"

# ------------------------------------------------------------------------------------- building MuonQ
def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model under DDP/compile wrappers: param_groups needs its module names and embedding getters."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model)


def _no_decay_names(model: torch.nn.Module) -> set[str]:
    """Parameter names the Trainer exempts from weight decay (biases, norms), from the Trainer's own rule."""
    from transformers import Trainer

    # get_decay_parameter_names does not use `self` (checked on 4.57 and 5.x): the single source of the rule.
    decay = set(Trainer.get_decay_parameter_names(None, model))
    return {name for name, _ in model.named_parameters() if name not in decay}


def optimizer_cls_and_kwargs(args: Any, model: torch.nn.Module | None) -> tuple[type[MuonQ], dict[str, Any]]:
    """``(MuonQ, kwargs)`` for a Trainer, from TrainingArguments and ``--optim_args``.

    ``kwargs["params"]`` holds the Muon/AdamW param groups of the unwrapped model (the Trainer uses them in
    place of its own two groups). The Trainer's no-decay names (biases, norms) get no weight decay.
    """
    if model is None:
        raise ValueError("--optim muonq needs the model to split its parameters into Muon and AdamW groups")
    check_model(model)  # refuses FSDP1, whose 1-D shard views would silently route every matrix to AdamW
    options = parse_optim_args(getattr(args, "optim_args", None))
    split_qkv = options.pop("split_qkv", True)
    names = {key: options.pop(key, "") for key in ("adamw_names", "muon_names")}
    if options.get("seed") is None:
        options["seed"] = int(args.seed)
    model = _unwrap(model)
    routes = route(model, split_qkv, _no_decay_names(model), **names)
    targets = getattr(args, "optim_target_modules", None)
    if targets is not None:  # HF's way of naming the modules of a matrix optimizer (GaLore, APOLLO)
        routes = restrict_to_target_modules(routes, targets)
    hyper = dict(
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        weight_decay=args.weight_decay,
    )
    logger.info(routing_summary(routes, {**hyper, **options}))
    kwargs = dict(params=groups_from_routes(routes, weight_decay=args.weight_decay), **hyper, **options)
    return trainer_optimizer_cls(args), kwargs  # DeepSpeedMuonQ under --deepspeed; refuses unsupported configs


def restrict_to_target_modules(routes: list[Route], targets: str | list[str]) -> list[Route]:
    """``--optim_target_modules`` with ``--optim muonq``: Muon steps the matrices of the named modules only, and the
    routing's other Muon matrices go to AdamW; embeddings, heads, norms and biases stay where the routing puts
    them. Names match as transformers matches them for GaLore: a string is a regex that must match a module's
    whole name ("all-linear": every matrix the routing gives Muon); a list holds names, substrings of names or
    regexes. A selection that leaves Muon nothing is refused."""
    if not isinstance(targets, (str, list)) or (isinstance(targets, list) and not all(isinstance(t, str) for t in
                                                                                       targets)):
        raise TypeError(f"optim_target_modules={targets!r}: expected a regex string, a list of strings or 'all-linear'")
    if isinstance(targets, str) and targets.replace("_", "-") == "all-linear":
        return routes

    def named(module: str) -> bool:
        if isinstance(targets, str):
            return re.fullmatch(targets, module) is not None
        return any(t == module or t in module or re.fullmatch(t, module) for t in targets)

    out = [r if not r.muon or named(r.name.rsplit(".", 1)[0]) else
           dataclasses.replace(r, muon=False, plan={}, reason=f"not in optim_target_modules {targets!r}")
           for r in routes]
    if not any(r.muon for r in out):
        muon = [r.name.rsplit(".", 1)[0] for r in routes if r.muon]
        raise ValueError(
            f"--optim muonq: optim_target_modules={targets!r} names no module whose matrix MuonQ steps with Muon "
            f"(those are {muon[:4]}{' ...' if len(muon) > 4 else ''}); name some of them, or drop "
            "optim_target_modules to use the routing's choice"
        )
    return out


def muonq_handler(ctx: Any) -> tuple[type[MuonQ], dict[str, Any]]:
    """Handler for transformers >= 5.2's ``_OPTIMIZER_HANDLERS`` table (ctx: ``OptimizerContext``)."""
    return optimizer_cls_and_kwargs(ctx.args, ctx.model)


# ------------------------------------------------------------------------------------------ registration
def _add_enum_member(enum_cls: type, name: str, value: str) -> None:
    """Add ``name = value`` to a str-valued Enum in place (what ``aenum.extend_enum`` does), idempotently."""
    existing = enum_cls._value2member_map_.get(value)
    if existing is not None:
        if existing._name_ != name:
            raise RuntimeError(f"{enum_cls.__name__} already has {value!r} as {existing._name_}; not replacing it")
        return
    if name in enum_cls._member_map_:
        raise RuntimeError(f"{enum_cls.__name__}.{name} already exists with another value; not replacing it")
    member = str.__new__(enum_cls, value)
    member._name_, member._value_ = name, value
    member.__objclass__ = enum_cls
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(name)
    type.__setattr__(enum_cls, name, member)  # EnumType.__setattr__ refuses to bind member names


def _patch_training_args(module: ModuleType) -> None:
    _add_enum_member(module.OptimizerNames, ENUM_NAME, OPTIM_NAME)


def _patch_handler_table(module: ModuleType) -> None:
    table = getattr(module, "_OPTIMIZER_HANDLERS", None)
    if not isinstance(table, dict):
        return  # no handler table in this version: the Trainer patch below takes over
    handler = table.get(OPTIM_NAME)
    if handler is not None and handler is not muonq_handler:
        raise RuntimeError(f"transformers already has an optimizer handler for {OPTIM_NAME!r}; not replacing it")
    table[module.OptimizerNames(OPTIM_NAME)] = muonq_handler


def _has_handler_table() -> bool:
    import importlib.util

    if importlib.util.find_spec("transformers.trainer_optimizer") is None:
        return False
    import transformers.trainer_optimizer as trainer_optimizer

    return isinstance(getattr(trainer_optimizer, "_OPTIMIZER_HANDLERS", None), dict)


def _patch_trainer(module: ModuleType) -> None:
    """transformers 4.x: answer ``muonq`` in ``Trainer.get_optimizer_cls_and_kwargs``, delegate the rest."""
    trainer_cls = module.Trainer
    if _has_handler_table() or getattr(trainer_cls.get_optimizer_cls_and_kwargs, "_muonq_patched", False):
        return
    original = trainer_cls.get_optimizer_cls_and_kwargs  # a staticmethod: plain function on attribute access

    def get_optimizer_cls_and_kwargs(args: Any, model: Any = None) -> tuple[Any, Any]:
        if args.optim == OPTIM_NAME:
            return optimizer_cls_and_kwargs(args, model)
        return original(args, model)

    get_optimizer_cls_and_kwargs._muonq_patched = True  # type: ignore[attr-defined]
    get_optimizer_cls_and_kwargs.__doc__ = original.__doc__
    trainer_cls.get_optimizer_cls_and_kwargs = staticmethod(get_optimizer_cls_and_kwargs)


class _CallbackLoader(importlib.abc.Loader):
    """Runs the callbacks waiting for a module right after the wrapped loader has executed it."""

    def __init__(self, loader: importlib.abc.Loader, name: str, hooks: _PostImportHooks) -> None:
        self._loader, self._name, self._hooks = loader, name, hooks

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        # popped only now: importlib.util.find_spec() also calls find_spec without loading the module
        for callback in self._hooks.pending.pop(self._name, []):
            callback(module)

    def __getattr__(self, name: str) -> Any:  # get_source, is_package, ... for inspect and linecache
        return getattr(self._loader, name)


class _PostImportHooks(importlib.abc.MetaPathFinder):
    """A meta-path finder that only wraps the loaders of the modules it waits for; it finds nothing itself."""

    def __init__(self) -> None:
        self.pending: dict[str, list[Callable[[ModuleType], None]]] = {}

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _CallbackLoader(spec.loader, fullname, self)
        return spec


_HOOKS = _PostImportHooks()
_LOCK = threading.Lock()
_REGISTERED = False


def _when_imported(name: str, callback: Callable[[ModuleType], None]) -> None:
    module = sys.modules.get(name)
    if module is not None:
        callback(module)
        return
    _HOOKS.pending.setdefault(name, []).append(callback)
    if _HOOKS not in sys.meta_path:
        sys.meta_path.insert(0, _HOOKS)


def register() -> None:
    """Make ``muonq`` a Trainer optimizer; idempotent, imports nothing from transformers by itself."""
    global _REGISTERED
    with _LOCK:
        if _REGISTERED:
            return
        _REGISTERED = True
        _when_imported("transformers.training_args", _patch_training_args)
        _when_imported("transformers.trainer_optimizer", _patch_handler_table)
        _when_imported("transformers.trainer", _patch_trainer)


def is_registered() -> bool:
    """True once ``muonq`` is in ``OptimizerNames`` and the Trainer can build it (imports transformers)."""
    from transformers.training_args import OptimizerNames

    if OPTIM_NAME not in OptimizerNames._value2member_map_:
        return False
    if _has_handler_table():
        from transformers.trainer_optimizer import _OPTIMIZER_HANDLERS

        return _OPTIMIZER_HANDLERS.get(OPTIM_NAME) is muonq_handler
    from transformers import Trainer

    return getattr(Trainer.get_optimizer_cls_and_kwargs, "_muonq_patched", False)
