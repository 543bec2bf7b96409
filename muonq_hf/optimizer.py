"""MuonQ: Muon with a 4-bit momentum for hidden matrices, AdamW for everything else, in one optimizer."""

from __future__ import annotations

import logging
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch

from .backends import Backend, Task, choose_backend, is_dtensor
from .checkpoint import (
    ADAMW_STORAGE,
    MUON_STORAGE,
    CheckpointError,
    check_state_dict,
    convert_state,
    storage_changes,
)
from .graphs import GraphRefused, StepGraph
from .matrices import MatrixPlan, plan_of, shaped
from .momentum import momentum_step
from .options import DEFAULTS, validate_group
from .weights import KAHAN, LOW_PRECISION, MAX_KEYED_ELEMENTS, rounded_weight

logger = logging.getLogger("transformers.muonq_hf")  # follows the Trainer's --log_level, like its own lines


@contextmanager
def _suspended(optimizer: torch.optim.Optimizer, *hooks: str) -> Iterator[None]:
    """Torch's hook tables ``hooks`` of ``optimizer`` emptied for a while: MuonQ runs those hooks itself, where its
    own part of the load or save is complete."""
    held = {name: getattr(optimizer, name) for name in hooks}
    for name in hooks:
        setattr(optimizer, name, OrderedDict())
    try:
        yield
    finally:
        for name, table in held.items():
            setattr(optimizer, name, table)


@contextmanager
def _in_group(g: int) -> Iterator[None]:
    """A refusal raised inside names param group ``g`` and says that nothing changed (every check runs first)."""
    try:
        yield
    except ValueError as exc:
        raise ValueError(f"{exc} (param group {g}; no state or weight was changed)") from None


def check_parameter(p: torch.Tensor, group: dict) -> None:
    """Refuse a parameter its group cannot step, naming its shape: a non-real dtype; for Muon, fewer than 2 dims, no
    elements, or a matrix plan (``qkv_split``, ``piece_sizes``, ``experts``) that does not fit it."""
    if isinstance(p, torch.Tensor) and not p.is_floating_point():
        raise ValueError(
            f"MuonQ steps real floating-point parameters, got one of shape {tuple(p.shape)} and dtype "
            f"{p.dtype}; view a complex parameter as real (torch.view_as_real) or leave it out"
        )
    if not group["use_muon"]:
        return
    p = shaped(p)  # ZeRO-3 partitioned: its own shape
    if p.ndim < 2:
        raise ValueError(
            f"use_muon=True needs tensors of >= 2 dims, got shape {tuple(p.shape)}; put 1-D tensors "
            "(norms, biases) in an AdamW group (use_muon=False), e.g. with muonq_hf.param_groups(model). Under "
            "DeepSpeed ZeRO the optimizer sees 1-D flat partitions: use muonq_hf.deepspeed.DeepSpeedMuonQ"
        )
    if p.numel() == 0:
        raise ValueError(
            f"use_muon=True needs a matrix with elements, got an empty parameter of shape {tuple(p.shape)}; "
            "put it in an AdamW group (use_muon=False) or leave it out"
        )
    plan_of(p, group)  # a plan that does not fit the tensor fails here, naming its shape


def _check_gradient(p: torch.Tensor) -> None:
    """Refuse a gradient that is not of its parameter's shape and dtype (set through ``.grad.data``, or by hand)."""
    grad = p.grad
    if grad is not None and (grad.shape != p.shape or grad.dtype != p.dtype):
        raise ValueError(
            f"MuonQ: a parameter of shape {tuple(p.shape)} and dtype {p.dtype} has a gradient of shape "
            f"{tuple(grad.shape)} and dtype {grad.dtype}; a gradient must match its parameter"
        )


GROUP_KEYS = frozenset(DEFAULTS) | {"params"}
# Keys that callers (HF Trainer, Accelerate, schedulers, param_groups) may add to a group; carried, not used.
PASSTHROUGH_KEYS = frozenset({"name", "names", "initial_lr", "param_names", "kind"})


class MuonQ(torch.optim.Optimizer):
    """Muon with a quantized (default 4-bit) momentum for ``use_muon`` groups, AdamW for the others.

    Muon groups (``use_muon=True``, hidden matrices; any >= 2-D tensor viewed as (shape[0], rest)):
    the MuonQ step (docs/design.md) -- normalize the gradient, update the momentum, normalize it, split it
    into a power-iteration rank-r part P R^T and a residual, store Q4(residual), Q4(P), Q4(R) with mu-law
    companding, and apply ``lr * 0.2 * sqrt(max(m, n)) * NS5(momentum)`` with decoupled weight decay.
    ``bits=32, normalize=False, rank_divisor=0, mu=0`` is plain fp32 Muon.

    AdamW groups: torch's AdamW (decoupled weight decay, bias correction), with fp32 or blockwise 8-bit
    moments (``adamw_bits``).

    Every option is a per-group key (``muonq_hf.options.DEFAULTS``, checked by ``options.RULES``); constructor
    arguments set the defaults. Choices where the paper is silent:
      * rank_divisor leaving r = 0 for a matrix (min(m, n) < rank_divisor): that matrix gets no split.
      * non-finite gradients: ``nonfinite="error"`` (default) raises FloatingPointError before any state or
        weight is touched; ``nonfinite="skip"`` skips the whole step (counted in ``skipped_steps``).
      * the first-step Gaussian and stochastic rounding draw from generators keyed by (seed, parameter
        index, step), the index being the parameter's position in ``param_groups``: identical on every rank
        and after a resume.
      * distributed (``muonq_hf.backends``, chosen once per set of parameters): DTensor (FSDP2) parameters get
        row-sharded state and one Newton-Schulz per matrix in the world; ``ddp_shard_state=True`` shards the
        state across DDP ranks (ZeRO-1), which makes ``state_dict()`` a collective call.
      * ``batch_elements``: same-shape matrices of different parameters (the layers of a model) step together,
        one kernel per operation for all of them, up to this many gradient elements per batch; the values are
        those of one-by-one steps. None (default): 2^23 on CUDA, 2^21 elsewhere (``backends.common.BATCH_ELEMENTS``);
        0: one matrix at a time. One process and DDP; FSDP2 and DeepSpeed step matrix by matrix.
      * ``cuda_graph=True``: the step's device work is recorded once as a CUDA graph and replayed
        (``muonq_hf.graphs``); lr may change every step, other changes record again. One process and
        replicated DDP on CUDA.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 0.02,
        *,
        nonfinite: str = "error",
        ddp_shard_state: bool = False,
        batch_elements: int | None = None,
        cuda_graph: bool = False,
        **options: Any,
    ) -> None:
        unknown = set(options) - (GROUP_KEYS - {"params", "use_muon"})
        if unknown:
            raise TypeError(
                f"MuonQ got unknown option(s) {sorted(unknown)}; allowed: "
                f"{sorted(GROUP_KEYS - {'params', 'use_muon'})} and nonfinite"
            )
        if nonfinite not in ("error", "skip"):
            raise ValueError(f"nonfinite must be 'error' or 'skip', got {nonfinite!r}")
        if not isinstance(ddp_shard_state, bool):
            raise ValueError(f"MuonQ: ddp_shard_state={ddp_shard_state!r} is not allowed; it must be True or False")
        if batch_elements is not None and (type(batch_elements) is not int or batch_elements < 0):
            raise ValueError(
                f"MuonQ: batch_elements={batch_elements!r} is not allowed; it must be None (the device's default: "
                "2^23 gradient elements per group on CUDA, 2^21 elsewhere), 0 (one matrix at a time) or a positive int "
                "(gradient elements per batch of same-shape matrices stepped together)"
            )
        if not isinstance(cuda_graph, bool):
            raise ValueError(f"MuonQ: cuda_graph={cuda_graph!r} is not allowed; it must be True or False")
        self.batch_elements = batch_elements
        self.cuda_graph = cuda_graph
        self._graph = StepGraph()  # the recorded step (muonq_hf.graphs), used with cuda_graph=True
        defaults = {**DEFAULTS, **options, "lr": lr}
        self.nonfinite = nonfinite
        self.skipped_steps = 0
        self.ddp_shard_state = ddp_shard_state  # ZeRO-1 by whole tensors under DDP (backends.owner)
        params = list(params)
        routed = any(isinstance(g, dict) and "use_muon" in g for g in params)  # the caller chose the routing
        super().__init__(params, defaults)
        matrices = [p for g in self.param_groups if not g["use_muon"] for p in g["params"] if shaped(p).ndim >= 2]
        if matrices and not routed:
            warnings.warn(
                f"MuonQ got {len(matrices)} matrices but no use_muon=True group: every parameter is updated by AdamW "
                "and nothing by Muon. Build the groups with muonq_hf.param_groups(model)",
                UserWarning,
                stacklevel=2,
            )

    # ------------------------------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict) -> None:
        unknown = set(param_group) - GROUP_KEYS - PASSTHROUGH_KEYS
        if unknown:
            raise ValueError(f"MuonQ param group has unknown key(s) {sorted(unknown)}; allowed: {sorted(GROUP_KEYS)}")
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        param_group = {**param_group, "params": params}
        group = {**self.defaults, **param_group}
        validate_group(group)
        for p in params:  # before the group is added: a refusal leaves the optimizer as it was
            check_parameter(p, group)
        if not group["use_muon"] and group["adamw_lr"] is not None and "lr" not in param_group:
            param_group = {**param_group, "lr": group["adamw_lr"]}
        super().add_param_group(param_group)
        self._remember_adamw_lr()
        if hasattr(self, "_graph"):  # a recorded step does not know the new parameters
            self._graph.reset()

    def _remember_adamw_lr(self) -> None:
        """``adamw_lr`` sets an AdamW group's lr when the group is built: an edit after that is refused at the step
        (it would do nothing), so its value then is kept."""
        self._adamw_lr = [group.get("adamw_lr") for group in self.param_groups]

    # ------------------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # 0. the groups as they are now (schedulers and user code edit them): the constructor's rules, and each
        #    parameter's state of the kind its group steps, before anything changes
        self._check_groups()
        backend, tasks = self._backend(), self._tasks()
        # 1. one non-finite decision for every gradient, agreed by all ranks, before anything changes
        grads = [t.param.grad for t in tasks if t.param.grad is not None]
        sparse = [tuple(g.shape) for g in grads if g.is_sparse]
        if sparse:
            raise ValueError(
                f"MuonQ does not support sparse gradients (parameters of shape {sparse[:3]}): build the embedding "
                "with sparse=False; no state or weight was changed"
            )
        if not backend.all_finite(grads):
            if self.nonfinite == "error":
                raise FloatingPointError(
                    "MuonQ: non-finite gradient (inf or nan) found before the step; no state or weight was "
                    "changed. Lower the lr, enable gradient clipping, or pass nonfinite='skip' to skip such steps"
                )
            self.skipped_steps += 1
            return loss
        if self.cuda_graph and not backend.capturable:
            raise GraphRefused(
                f"MuonQ: cuda_graph=True records the step of one process (or of each replicated DDP rank); this "
                f"optimizer's state is sharded ({type(backend).__name__}: FSDP2 or ddp_shard_state) or its momentum "
                "stage is replaced, which it cannot record. Pass cuda_graph=False"
            )
        # 2. a state written with other storage options is re-encoded first; Kahan buffers no longer used go
        self._convert_if_options_changed()
        self._drop_unused_compensation()
        # 3. momentum -> orthogonalize -> apply, each stage where the backend runs it (recorded: muonq_hf.graphs)
        if self.cuda_graph:
            self._graph.step(lambda graph_tasks: backend.step(graph_tasks, self.state), tasks, self.state)
        else:
            backend.step(tasks, self.state)
        return loss

    def _check_groups(self, params: bool = True, stepping: bool = True) -> None:
        """The groups as they are now (schedulers and user code edit them), before anything changes: every option
        present and by ``options.RULES`` (a value edited after construction, e.g. ``group["lr"] = nan``, is refused
        as the constructor refuses it) and ``weight_update`` against the parameters; with ``params`` (not under
        DeepSpeed ZeRO, whose flat partitions are its own) every parameter once, fitting its group's plan, and with
        ``stepping`` (a step, not a load) with a gradient of its shape and dtype and no state of the other kind
        (``use_muon`` switched after steps: refused, not converted; docs/design.md, "Choices where the paper is
        silent")."""
        for g, group in enumerate(self.param_groups):
            missing = [k for k in DEFAULTS if k not in group]
            with _in_group(g):
                if missing:
                    raise ValueError(
                        f"MuonQ: the option {missing[0]!r} is missing (deleted, or the group was appended to "
                        "param_groups instead of passed to add_param_group); every group holds every option"
                    )
                validate_group(group)
                built = getattr(self, "_adamw_lr", [])
                if g < len(built) and group["adamw_lr"] != built[g]:
                    raise ValueError(
                        f"MuonQ: adamw_lr changed from {built[g]!r} to {group['adamw_lr']!r}; adamw_lr sets the lr of "
                        "the AdamW groups when they are built and would do nothing now: set the group's 'lr' instead"
                    )
        modes = {group["weight_update"] for group in self.param_groups} - {"nearest"}
        dtypes = {p.dtype for group in self.param_groups for p in group["params"]}
        if modes and not dtypes & set(LOW_PRECISION):
            raise ValueError(
                f"MuonQ: weight_update={sorted(modes)[0]!r} keeps the changes of bf16 / fp16 weights, but every "
                f"parameter this optimizer steps is {', '.join(sorted(map(str, dtypes)))} (an fp32 weight, or an fp32 "
                "master copy under AMP or DeepSpeed, takes every change already); pass weight_update='nearest'. No "
                "state or weight was changed"
            )
        seen: set[int] = set()
        for g, group in enumerate(self.param_groups):
            huge = [p for p in group["params"] if p.dtype in LOW_PRECISION and p.numel() > MAX_KEYED_ELEMENTS]
            if group["weight_update"] == "stochastic" and huge:
                raise ValueError(
                    f"MuonQ: weight_update='stochastic' keys its noise by element, at most 2^32 per parameter; param "
                    f"group {g} has one of shape {tuple(huge[0].shape)}: use weight_update='kahan'. No state or weight "
                    "was changed"
                )
            for p in group["params"] if params else ():
                with _in_group(g):
                    if id(p) in seen:
                        raise ValueError(f"MuonQ: a parameter of shape {tuple(p.shape)} is listed twice")
                    seen.add(id(p))
                    check_parameter(p, group)
                    if stepping:
                        _check_gradient(p)
                state = self.state.get(p)
                if not stepping or not state:
                    continue
                adamw_state = any(k in state for k in ("exp_avg", "exp_avg_codes"))
                if adamw_state == bool(group["use_muon"]):
                    kind, other = ("Muon", "AdamW") if group["use_muon"] else ("AdamW", "Muon")
                    raise ValueError(
                        f"MuonQ: param group {g} has use_muon={group['use_muon']}, but its parameter of shape "
                        f"{tuple(shaped(p).shape)} holds {other} state from earlier steps: switching a parameter "
                        f"between Muon and AdamW mid-run is not supported (its {other} state cannot become {kind} "
                        "state); restore use_muon, or build a new optimizer. No state or weight was changed"
                    )

    def _drop_unused_compensation(self) -> None:
        """Free the Kahan buffers of weights that no longer take compensated changes (``weight_update`` edited, the
        weights cast to fp32): what they held is below half an ulp of each weight."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state and KAHAN in state and not (group["weight_update"] == "kahan" and rounded_weight(p, group)):
                    del state[KAHAN]

    def momentum_stage(
        self, plan: MatrixPlan, G: torch.Tensor, state: dict, group: dict, index: int, **rows: Any
    ) -> torch.Tensor:
        """The momentum stage every backend calls (``muonq_hf.momentum.momentum_step``); a subclass may replace it
        (the benchmarks' bf16-momentum Muon does), and then every backend runs the replacement."""
        return momentum_step(plan, G, state, group, index, **rows)

    def _tasks(self) -> list[Task]:
        """Every parameter with its position in ``param_groups`` (which keys its generators) and its group."""
        params = [(group, p) for group in self.param_groups for p in group["params"]]
        return [Task(index, group, p) for index, (group, p) in enumerate(params)]

    def _backend(self) -> Backend:
        """The backend, chosen once for these parameter objects: Accelerate and FSDP2 replace the parameters
        after the optimizer is built, so a new set of parameter objects chooses again."""
        key = tuple((id(p), is_dtensor(p)) for group in self.param_groups for p in group["params"])
        cached = getattr(self, "_chosen", None)
        if cached is None or cached[0] != key:
            params = (p for group in self.param_groups for p in group["params"])
            own_stage = type(self).momentum_stage is MuonQ.momentum_stage  # a replaced stage runs matrix by matrix
            backend = choose_backend(params, self.ddp_shard_state, self.momentum_stage, self.batch_elements, own_stage)
            self._chosen = (key, backend)
        return self._chosen[1]

    # ------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """With ``ddp_shard_state`` this is collective (all ranks call it) and returns the full state everywhere.
        Hooks as torch's: pre-hooks before anything, post-hooks on the whole dict (MuonQ's own entry included)."""
        with self.full_state(), _suspended(self, "_optimizer_state_dict_post_hooks"):  # this rank keeps its part
            out = super().state_dict()  # (the state dict pre-hooks run in it)
        out = {**out, "muonq": {"skipped_steps": self.skipped_steps}}
        for hook in self._optimizer_state_dict_post_hooks.values():
            out = hook(self, out) or out
        return out

    def full_state(self) -> AbstractContextManager[None]:
        """A context in which ``self.state`` holds the whole state on every rank (collective under
        ``ddp_shard_state``: every rank must enter it; elsewhere it changes nothing)."""
        return self._backend().full_state(self._tasks(), self.state)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a MuonQ state: checked first (nothing changes on a refusal), then loaded, then converted.

        * ``check_state_dict`` refuses a state that does not fit (other routing, shapes, a torch.optim state)
          or is corrupt (non-finite scales or moments, negative second moments), naming parameter and entry.
        * torch's loader takes the saved hyperparameters of each group (lr, betas, momentum, ...) and casts
          floating state to the parameter dtype; the saved dtypes are restored after it.
        * Storage options given now (bits, rank_divisor, mu, block_size, normalize/store_norm, adamw_bits, the
          matrix plan) win over the saved ones: the state is decoded and re-encoded, with one log line.
        * Hooks as torch's (``register_load_state_dict_pre_hook`` / ``_post_hook``): the pre-hooks get a shallow
          copy first and what they return is what is checked and loaded; the post-hooks run once the load is
          complete (converted, and under ``ddp_shard_state`` cut to this rank's part).
        """
        state_dict = state_dict.copy()
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            state_dict = hook(self, state_dict) or state_dict
        self._check_groups(self._checks_parameters(), stepping=False)  # the groups it converts to (edited before)
        self._check_loaded(state_dict)
        skipped = state_dict.get("muonq", {"skipped_steps": 0})
        count = skipped.get("skipped_steps", 0) if isinstance(skipped, dict) else None
        if type(count) is not int or count < 0:
            raise CheckpointError(
                f"MuonQ.load_state_dict: the checkpoint's 'muonq' entry is {skipped!r}; expected "
                "{'skipped_steps': an int >= 0}: the checkpoint is corrupt"
            )
        now = [dict(group) for group in self.param_groups]
        changes = self._storage_changes(state_dict, now)
        with _suspended(self, "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks"):
            super().load_state_dict(state_dict)
        saved_groups = state_dict["param_groups"]
        for saved_group, group in zip(saved_groups, self.param_groups, strict=True):
            for saved_id, p in zip(saved_group["params"], group["params"], strict=True):
                for key, value in state_dict["state"].get(saved_id, {}).items():
                    if torch.is_tensor(value) and self.state[p][key].dtype != value.dtype:
                        self.state[p][key] = value.to(device=self.state[p][key].device, copy=True)
        self.skipped_steps = count
        self._graph.reset()  # the recorded step read the tensors this load replaced
        # torch's loader put the saved options in the groups; options the checkpoint predates were their defaults
        saved = [{**self.defaults, **group} for group in self.param_groups]
        for g, group in enumerate(self.param_groups):
            for key, value in now[g].items():  # options the checkpoint predates take the values given now
                group.setdefault(key, value)
            keys = MUON_STORAGE if group["use_muon"] else ADAMW_STORAGE  # storage options given now win
            group.update({k: now[g][k] for k in (*keys, "weight_update")})  # and how the weights take changes
        self._remember_storage()
        self._remember_adamw_lr()  # the checkpoint's, restored as a hyperparameter
        if changes:
            self._convert(changes, saved, "the checkpoint was saved with other storage options")
        self._drop_unused_compensation()
        self._backend().keep_local(self._tasks(), self.state)  # DDP state sharding: keep only this rank's part
        self._after_load()
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _after_load(self) -> None:
        """A subclass's bookkeeping once a state is loaded, before the post-hooks (DeepSpeed's group ids)."""

    def _checks_parameters(self) -> bool:
        """Whether the groups hold the model's parameters (not DeepSpeed ZeRO's flat partitions)."""
        return True

    def _check_loaded(self, state_dict: dict) -> None:
        """Refuse a state that does not fit or is corrupt (``check_state_dict``), before anything changes; DeepSpeed
        checks its flat state its own way."""
        check_state_dict(self.param_groups, self.defaults, state_dict)

    def _storage_changes(self, state_dict: dict, now: list[dict]) -> dict[int, dict[str, tuple[Any, Any]]]:
        """{group: {option: (saved, now)}} where the storage options differ; refused where state is sharded."""
        out = {}
        for g, (saved, group) in enumerate(zip(state_dict["param_groups"], now, strict=True)):
            changes = storage_changes({**self.defaults, **saved}, group)
            if not changes:
                continue
            option, (was, now_value) = next(iter(changes.items()))
            self._refuse_sharded_conversion(
                [state_dict["state"].get(i, {}) for i in saved["params"]],
                f"MuonQ.load_state_dict: {option} is {was!r} in the checkpoint and {now_value!r} now",
                f"resume with {option}={was!r}, or convert the checkpoint in one process",
            )
            out[g] = changes
        return out

    def _refuse_sharded_conversion(self, states: list[dict], what: str, advice: str) -> None:
        """Conversions re-encode whole matrices: a sharded (FSDP2 DTensor / ddp_shard_state) state is refused."""
        if self.ddp_shard_state or any(hasattr(v, "to_local") for state in states for v in state.values()):
            raise CheckpointError(
                f"{what}; converting a sharded (FSDP2 / ddp_shard_state) state is not supported: {advice}"
            )

    def _convert(self, changes: dict[int, dict[str, tuple[Any, Any]]], saved: list[dict], why: str) -> None:
        """Re-encode the state of the changed groups from their ``saved`` options to the ones they hold now."""
        index, converted = 0, {}
        for g, group in enumerate(self.param_groups):
            if g in changes:
                for i, p in enumerate(group["params"]):
                    if self.state.get(p):
                        converted[p] = convert_state(p, self.state[p], saved[g], group, index + i)
            index += len(group["params"])
        self.state.update(converted)  # all at once: a conversion that fails leaves every state as it was
        self._remember_storage()
        lines = [
            f"group {g}: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in c.items()) for g, c in changes.items()
        ]
        logger.warning("MuonQ: %s; the state was converted to the options given now (%s)", why, "; ".join(lines))

    def _remember_storage(self) -> None:
        """The storage options the state of each group is written with (a later change converts the state)."""
        self._stored_with = [dict(group) for group in self.param_groups]

    def _convert_if_options_changed(self) -> None:
        """Storage options changed in ``param_groups`` since the state was written: convert before stepping."""
        stored = getattr(self, "_stored_with", None)
        if stored is None or len(stored) != len(self.param_groups):
            return self._remember_storage()
        changes = {}
        for g, (was, group) in enumerate(zip(stored, self.param_groups, strict=True)):
            diff = storage_changes(was, group)
            if diff and any(self.state.get(p) for p in group["params"]):
                changes[g] = diff
        if not changes:
            return None
        g, diff = next(iter(changes.items()))
        option, (was, now) = next(iter(diff.items()))
        self._refuse_sharded_conversion(
            [self.state.get(p, {}) for g in changes for p in self.param_groups[g]["params"]],
            f"MuonQ: {option} of param group {g} changed from {was!r} to {now!r} after the state was written",
            "keep the option",
        )
        self._convert(changes, stored, "storage options changed in param_groups")
        return None

