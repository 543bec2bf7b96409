"""MuonQ: Muon with a 4-bit momentum for hidden matrices, AdamW for everything else, in one optimizer."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from .codecs import DynamicCodebook, dequantize_dynamic8, dynamic_codebook, quantize_dynamic8
from .matrices import plan_of
from .momentum import apply_update, momentum_step, orthogonalized_update
from .options import ADAMW_DEFAULTS, COMMON_DEFAULTS, MUON_DEFAULTS, validate_group

GROUP_KEYS = frozenset(MUON_DEFAULTS) | frozenset(ADAMW_DEFAULTS) | frozenset(COMMON_DEFAULTS) | {"params"}
# Keys that callers (HF Trainer, Accelerate, schedulers, param_groups) may add to a group; carried, not used.
PASSTHROUGH_KEYS = frozenset({"name", "names", "initial_lr", "param_names", "kind"})
ADAMW_8BIT_MIN_NUMEL = 4096  # like bitsandbytes' min_8bit_size: tiny tensors keep fp32 moments
ADAMW_8BIT_BLOCK = 256


class MuonQ(torch.optim.Optimizer):
    """Muon with a quantized (default 4-bit) momentum for ``use_muon`` groups, AdamW for the others.

    Muon groups (``use_muon=True``, hidden matrices; any >= 2-D tensor viewed as (shape[0], rest)):
    the MuonQ step of SPEC section 3 -- normalize the gradient, update the momentum, normalize it, split it
    into a power-iteration rank-r part P R^T and a residual, store Q4(residual), Q4(P), Q4(R) with mu-law
    companding, and apply ``lr * 0.2 * sqrt(max(m, n)) * NS5(momentum)`` with decoupled weight decay.
    ``bits=32, normalize=False, rank_divisor=0, mu=0`` is plain fp32 Muon.

    AdamW groups: torch's AdamW (decoupled weight decay, bias correction), with fp32 or blockwise 8-bit
    moments (``adamw_bits``).

    Every option is a per-group key (see ``MUON_DEFAULTS``/``ADAMW_DEFAULTS``); constructor arguments set
    the defaults. Choices where the paper is silent:
      * rank_divisor leaving r = 0 for a matrix (min(m, n) < rank_divisor): that matrix gets no split.
      * non-finite gradients: ``nonfinite="error"`` (default) raises FloatingPointError before any state or
        weight is touched; ``nonfinite="skip"`` skips the whole step (counted in ``skipped_steps``).
      * the first-step Gaussian and stochastic rounding draw from generators keyed by (seed, parameter
        index, step), the index being the parameter's position in ``param_groups``: identical on every rank
        and after a resume.
      * distributed (``muonq_hf.distributed``): DTensor (FSDP2) parameters get row-sharded state and one
        Newton-Schulz per matrix in the world; ``ddp_shard_state=True`` shards the state across DDP ranks
        (ZeRO-1), which makes ``state_dict()`` a collective call.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 0.02,
        *,
        nonfinite: str = "error",
        ddp_shard_state: bool = False,
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
        defaults = {**COMMON_DEFAULTS, **MUON_DEFAULTS, **ADAMW_DEFAULTS, **options, "lr": lr}
        self.nonfinite = nonfinite
        self.skipped_steps = 0
        self.ddp_shard_state = ddp_shard_state  # ZeRO-1 by whole tensors under DDP (muonq_hf.distributed)
        super().__init__(params, defaults)

    # ------------------------------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict) -> None:
        unknown = set(param_group) - GROUP_KEYS - PASSTHROUGH_KEYS
        if unknown:
            raise ValueError(f"MuonQ param group has unknown key(s) {sorted(unknown)}; allowed: {sorted(GROUP_KEYS)}")
        group = {**self.defaults, **param_group}
        validate_group(group)
        if not group["use_muon"] and group["adamw_lr"] is not None and "lr" not in param_group:
            param_group = {**param_group, "lr": group["adamw_lr"]}
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            if group["use_muon"] and p.ndim < 2:
                raise ValueError(
                    f"use_muon=True needs tensors of >= 2 dims, got shape {tuple(p.shape)}; put 1-D tensors "
                    "(norms, biases) in an AdamW group (use_muon=False), e.g. with muonq_hf.param_groups(model)"
                )
            if group["use_muon"]:
                plan_of(p, group)  # a plan that does not fit the tensor fails here, naming its shape

    # ------------------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._grads_finite():
            if self.nonfinite == "error":
                raise FloatingPointError(
                    "MuonQ: non-finite gradient (inf or nan) found before the step; no state or weight was "
                    "changed. Lower the lr, enable gradient clipping, or pass nonfinite='skip' to skip such steps"
                )
            self.skipped_steps += 1
            return loss
        from .distributed import engine_for  # FSDP2 DTensors or DDP state sharding; None in one process

        engine = engine_for(self)
        if engine is not None:
            engine.step(self)
            return loss
        for index, group, p in self._indexed_params():
            if p.grad is None:
                continue
            if group["use_muon"]:
                self._muon_step(p, group, index)
            else:
                self._adamw_step(p, group)
        return loss

    def _indexed_params(self) -> Iterable[tuple[int, dict, torch.Tensor]]:
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                yield index, group, p
                index += 1

    def _grads_finite(self) -> bool:
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return True
        from .distributed import grads_finite, is_dtensor

        if any(is_dtensor(g) for g in grads):
            return grads_finite(grads)  # local shards, then agreed by all-reduce
        return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())

    # ------------------------------------------------------------------------------------------- Muon
    def _muon_step(self, p: torch.Tensor, group: dict, index: int) -> None:
        if p.ndim < 2:  # add_param_group rejected 1-D tensors: something (DeepSpeed ZeRO) swapped the parameters
            raise RuntimeError(
                f"MuonQ: a use_muon parameter is now 1-D (shape {tuple(p.shape)}): DeepSpeed ZeRO hands its client "
                "optimizer flat partitions, and Newton-Schulz on them would be wrong. Use "
                "muonq_hf.deepspeed.DeepSpeedMuonQ (ZeRO stage 1 or 2), or train without DeepSpeed"
            )
        update = muon_update(p.grad, self.state[p], group, index)
        apply_update(p, update, group["lr"], group["weight_decay"])

    # ------------------------------------------------------------------------------------------ AdamW
    def _adamw_step(
        self,
        p: torch.Tensor,
        group: dict,
        grad: torch.Tensor | None = None,
        state: dict | None = None,
        quantized: bool | None = None,
    ) -> None:
        """AdamW on p; the FSDP2 engine passes a local shard with its grad, state and the global ``quantized``."""
        state = self.state[p] if state is None else state
        if quantized is None:
            quantized = group["adamw_bits"] == 8 and p.ndim >= 2 and p.numel() >= ADAMW_8BIT_MIN_NUMEL
        grad = (p.grad if grad is None else grad).float()
        keys = ("exp_avg", "exp_avg_sq")
        if not state:
            state["step"] = torch.tensor(0.0)
            if quantized:
                for k in keys:
                    state[f"{k}_codes"], state[f"{k}_absmax"] = quantize_dynamic8(
                        torch.zeros_like(grad).reshape(p.shape[0], -1), _codebook(k, grad.device), ADAMW_8BIT_BLOCK
                    )
            else:
                state["exp_avg"] = torch.zeros_like(grad)
                state["exp_avg_sq"] = torch.zeros_like(grad)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        step = state["step"].item()
        if quantized:
            exp_avg, exp_avg_sq = (
                dequantize_dynamic8(state[f"{k}_codes"], state[f"{k}_absmax"], _codebook(k, grad.device)).view(p.shape)
                for k in keys
            )
        else:
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        if quantized:
            for k, value in zip(keys, (exp_avg, exp_avg_sq), strict=True):
                state[f"{k}_codes"], state[f"{k}_absmax"] = quantize_dynamic8(
                    value.reshape(p.shape[0], -1), _codebook(k, grad.device), ADAMW_8BIT_BLOCK
                )
        bias1, bias2 = 1 - beta1**step, 1 - beta2**step
        denom = (exp_avg_sq.sqrt() / math.sqrt(bias2)).add_(group["eps"])
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.addcdiv_(exp_avg.to(p.dtype), denom.to(p.dtype), value=-group["lr"] / bias1)

    # ------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """With ``ddp_shard_state`` this is collective (all ranks call it) and returns the full state everywhere."""
        from .distributed import engine_for

        engine = engine_for(self)
        if hasattr(engine, "gathered"):
            with engine.gathered(self):  # the returned dict keeps the full tensors; this rank keeps its part
                return super().state_dict()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loader casts floating state to the parameter dtype; restore the saved dtypes after it."""
        super().load_state_dict(state_dict)
        saved_groups = state_dict["param_groups"]
        for saved_group, group in zip(saved_groups, self.param_groups, strict=True):
            for saved_id, p in zip(saved_group["params"], group["params"], strict=True):
                for key, value in state_dict["state"].get(saved_id, {}).items():
                    if torch.is_tensor(value) and self.state[p][key].dtype != value.dtype:
                        self.state[p][key] = value.to(device=self.state[p][key].device, copy=True)
        from .distributed import engine_for

        engine = engine_for(self)
        if hasattr(engine, "localize"):  # DDP state sharding: keep only this rank's part
            engine.localize(self)


def _codebook(key: str, device: torch.device) -> DynamicCodebook:
    return dynamic_codebook(signed=key == "exp_avg", device=device)  # m is signed, v is not


def muon_update(grad: torch.Tensor, state: dict, group: dict, index: int) -> torch.Tensor:
    """The scaled Muon update of one whole parameter (momentum, then orthogonalize), shaped (E, m, n).

    ``grad`` has the parameter's shape; ``state`` is its MuonQ state, updated in place. Single process, the
    DDP owner of a matrix and the DeepSpeed owner all call this; FSDP2 splits it at the orthogonalization.
    """
    plan = plan_of(grad, group)
    X = momentum_step(plan, plan.view(grad.float()), state, group, index)  # (E, m, n)
    return orthogonalized_update(plan, X, group["ns_steps"])
