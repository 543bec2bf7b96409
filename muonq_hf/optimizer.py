"""MuonQ: Muon with a 4-bit momentum for hidden matrices, AdamW for everything else, in one optimizer."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from .codecs import (
    DynamicCodebook,
    dequantize,
    dequantize_dynamic8,
    dynamic_codebook,
    quantize,
    quantize_dynamic8,
)
from .lowrank import RowSum, power_iteration_split, rank_for
from .orthogonalize import muon_scale, zeropower_via_newtonschulz5

MUON_DEFAULTS: dict[str, Any] = dict(
    momentum=0.95,  # beta of the momentum M = beta * M + G
    nesterov=False,  # U = NS(G + beta * M) instead of NS(M)
    ns_steps=5,  # Newton-Schulz iterations (Keller's quintic)
    bits=4,  # momentum storage: 4 or 8 bit codes, or 32 = fp32 (no codec)
    normalize=True,  # pre-quantization normalization of G and of M (the paper's technique 1)
    rank_divisor=16,  # low-rank split rank r = min(m, n) // rank_divisor; 0 = no split (technique 2)
    mu=255.0,  # mu-law companding strength; 0 = linear codec (technique 3)
    block_size=None,  # None: one residual scale per matrix; int: scales per block of columns in each row
    stochastic_rounding=False,  # round codes stochastically (unbiased) instead of to nearest
    store_norm=False,  # keep ||M|| (4 bytes per matrix): "quantized standard Muon", see SPEC note (a)
    qkv_split=1,  # split a fused QKV matrix into this many pieces, each quantized and orthogonalized alone
    split_dim=0,  # axis of the (m, n) view along which qkv_split cuts: 0 for nn.Linear, 1 for HF Conv1D
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
)
GROUP_KEYS = frozenset(MUON_DEFAULTS) | frozenset(ADAMW_DEFAULTS) | frozenset(COMMON_DEFAULTS) | {"params"}
# Keys that callers (HF Trainer, Accelerate, schedulers, param_groups) may add to a group; carried, not used.
PASSTHROUGH_KEYS = frozenset({"name", "names", "initial_lr", "param_names", "kind"})
ADAMW_8BIT_MIN_NUMEL = 4096  # like bitsandbytes' min_8bit_size: tiny tensors keep fp32 moments
ADAMW_8BIT_BLOCK = 256


@dataclass(frozen=True)
class MatrixLayout:
    """How a Muon parameter is seen as a batch of k matrices (k, mp, np) for quantization and NS."""

    m: int  # rows of the 2-D view (p.shape[0])
    n: int  # columns of the 2-D view (prod(p.shape[1:]))
    k: int  # pieces (fused QKV = 3)
    split_dim: int

    @property
    def piece_shape(self) -> tuple[int, int]:
        return (self.m // self.k, self.n) if self.split_dim == 0 else (self.m, self.n // self.k)

    def to_pieces(self, rows: torch.Tensor) -> torch.Tensor:
        """Row layout (m, k*w) or (k*mp, w) -> pieces (k, mp, w); works for values, codes and row scales."""
        if self.split_dim == 0:
            return rows.reshape(self.k, rows.size(0) // self.k, rows.size(1))
        return rows.reshape(rows.size(0), self.k, rows.size(1) // self.k).permute(1, 0, 2)

    def to_rows(self, pieces: torch.Tensor) -> torch.Tensor:
        """Pieces (k, mp, w) -> row layout: row i of the result belongs to row i of the parameter."""
        k, mp, w = pieces.shape
        if self.split_dim == 0:
            return pieces.reshape(k * mp, w)
        return pieces.permute(1, 0, 2).reshape(mp, k * w)


def layout_of(p: torch.Tensor, group: dict) -> MatrixLayout:
    m, n = p.shape[0], math.prod(p.shape[1:])
    k, split_dim = group["qkv_split"], group["split_dim"]
    size = m if split_dim == 0 else n
    if size % k:
        raise ValueError(
            f"qkv_split={k} does not divide dim {split_dim} (size {size}) of a parameter of shape "
            f"{tuple(p.shape)}; use qkv_split=1 for this parameter or fix split_dim (0 or 1)"
        )
    return MatrixLayout(m, n, k, split_dim)


def _fro(x: torch.Tensor, row_sum: RowSum) -> torch.Tensor:
    """Frobenius norm of each piece of x (k, mp, np) -> (k, 1, 1), reduced over row shards."""
    return row_sum(x.square().sum(dim=(-2, -1), keepdim=True)).sqrt()


def _generator(seed: int, *key: int) -> torch.Generator:
    """A CPU generator keyed by (seed, *key): identical on every rank and after a resume."""
    g = torch.Generator(device="cpu")
    g.manual_seed(hash((seed, *key)) & 0x7FFF_FFFF_FFFF_FFFF)
    return g


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
        defaults = {**COMMON_DEFAULTS, **MUON_DEFAULTS, **ADAMW_DEFAULTS, **options, "lr": lr}
        self.nonfinite = nonfinite
        self.skipped_steps = 0
        self.ddp_shard_state = bool(ddp_shard_state)  # ZeRO-1 by whole tensors under DDP (muonq_hf.distributed)
        super().__init__(params, defaults)

    # ------------------------------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict) -> None:
        unknown = set(param_group) - GROUP_KEYS - PASSTHROUGH_KEYS
        if unknown:
            raise ValueError(f"MuonQ param group has unknown key(s) {sorted(unknown)}; allowed: {sorted(GROUP_KEYS)}")
        group = {**self.defaults, **param_group}
        if not group["use_muon"] and group["adamw_lr"] is not None and "lr" not in param_group:
            param_group = {**param_group, "lr": group["adamw_lr"]}
            group["lr"] = group["adamw_lr"]
        _validate_group(group)
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            if group["use_muon"] and p.ndim < 2:
                raise ValueError(
                    f"use_muon=True needs tensors of >= 2 dims, got shape {tuple(p.shape)}; put 1-D tensors "
                    "(norms, biases) in an AdamW group (use_muon=False), e.g. with muonq_hf.param_groups(model)"
                )

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
        layout = layout_of(p, group)
        G = layout.to_pieces(p.grad.reshape(layout.m, layout.n).float())  # (k, mp, np)
        state = self.state[p]
        U = muonq_update(G, state, group, layout, index)  # (k, mp, np)
        mp, np_ = layout.piece_shape
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(layout.to_rows(U).reshape(p.shape).to(p.dtype), alpha=-group["lr"] * muon_scale(mp, np_))

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


def _validate_group(group: dict) -> None:
    def bad(name: str, allowed: str) -> ValueError:
        return ValueError(f"MuonQ: {name}={group[name]!r} is not allowed; {name} must be {allowed}")

    if not (isinstance(group["lr"], (int, float, torch.Tensor)) and float(group["lr"]) >= 0):
        raise bad("lr", "a number >= 0")
    if group["bits"] not in (4, 8, 32):
        raise bad("bits", "one of 4, 8, 32")
    if group["adamw_bits"] not in (8, 32):
        raise bad("adamw_bits", "8 or 32")
    if not (isinstance(group["rank_divisor"], int) and group["rank_divisor"] >= 0):
        raise bad("rank_divisor", "an int >= 0 (0 = no low-rank split)")
    if not float(group["mu"]) >= 0:
        raise bad("mu", "a number >= 0 (0 = linear codec)")
    if group["block_size"] is not None and not (isinstance(group["block_size"], int) and group["block_size"] > 0):
        raise bad("block_size", "None (one scale per matrix) or an int > 0")
    if not 0 <= group["momentum"] < 1:
        raise bad("momentum", "in [0, 1)")
    if not (isinstance(group["ns_steps"], int) and group["ns_steps"] >= 1):
        raise bad("ns_steps", "an int >= 1")
    if float(group["weight_decay"]) < 0:
        raise bad("weight_decay", "a number >= 0")
    if not (isinstance(group["qkv_split"], int) and group["qkv_split"] >= 1):
        raise bad("qkv_split", "an int >= 1")
    if group["split_dim"] not in (0, 1):
        raise bad("split_dim", "0 or 1")
    b1, b2 = group["betas"]
    if not (0 <= b1 < 1 and 0 <= b2 < 1):
        raise bad("betas", "two numbers in [0, 1)")
    if not float(group["eps"]) >= 0:
        raise bad("eps", "a number >= 0")


# --------------------------------------------------------------------------------------------------------
# The MuonQ momentum step: a pure function of (G, state, options); the optimizer class only applies U.
# --------------------------------------------------------------------------------------------------------
def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def muonq_update(
    G: torch.Tensor,
    state: dict,
    group: dict,
    layout: MatrixLayout,
    index: int,
    row_sum: RowSum = _identity,
    row_max: RowSum = _identity,
    orthogonalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """One MuonQ momentum step for the pieces G (k, mp, np) of a matrix; updates ``state``, returns U.

    ``row_sum``/``row_max`` reduce across the ranks holding row shards of G (identity in one process) and
    ``orthogonalize`` replaces the local Newton-Schulz (a distributed caller assembles the whole matrix).
    """
    beta = group["momentum"]
    k, mp, np_ = G.shape
    r = rank_for(*layout.piece_shape, group["rank_divisor"])
    step = int(state["step"].item()) + 1 if "step" in state else 1

    M_prev, R_prev = _load_momentum(state, group, layout, r, G)  # (k, mp, np), (k, np, r)
    if M_prev is None:  # first step: zero momentum, seeded Gaussian warm start
        M_prev = torch.zeros_like(G)
        if r:
            R_prev = torch.randn((k, np_, r), generator=_generator(group["seed"], index), dtype=torch.float32)
            R_prev = R_prev.to(G.device)

    G_hat = G / (_fro(G, row_sum) + 1e-7) if group["normalize"] else G  # pre-quantization normalization
    M = beta * M_prev + G_hat  # (k, mp, np)
    if group["normalize"]:
        norm = _fro(M, row_sum)  # (k, 1, 1)
        M_bar = M / (norm + 1e-7)
    else:
        norm, M_bar = None, M

    if r:
        P, R, res = power_iteration_split(M_bar, R_prev, row_sum)  # (k, mp, r), (k, np, r), (k, mp, np)
    else:
        P = R = None
        res = M_bar
    _store_momentum(state, group, layout, res, P, R, norm, index, step, row_max)
    state["step"] = torch.tensor(float(step))

    U_in = G_hat + beta * M_bar if group["nesterov"] else M_bar
    if orthogonalize is not None:
        return orthogonalize(U_in)
    return zeropower_via_newtonschulz5(U_in, group["ns_steps"]).float()


def _granularity(group: dict) -> str:
    return "matrix" if group["block_size"] is None else "block"


def _load_momentum(
    state: dict, group: dict, layout: MatrixLayout, r: int, G: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Dequantized previous momentum (k, mp, np) and right factor (k, np, r); (None, None) before step 1."""
    if "step" not in state:
        return None, None
    bits, mu = group["bits"], float(group["mu"])
    k, mp, np_ = G.shape
    if bits == 32:
        M = layout.to_pieces(state["res"]).clone()
        R = state.get("R")
        if R is not None:
            M = M + layout.to_pieces(state["P"]) @ R.mT
    else:
        scale = state["res_scale"]
        scale = scale.view(k, 1, 1) if scale.ndim == 1 else layout.to_pieces(scale)
        M = dequantize(
            layout.to_pieces(state["res_codes"]), scale, np_, bits, mu, _granularity(group), group["block_size"]
        )
        R = None
        if "R_codes" in state:
            P = dequantize(layout.to_pieces(state["P_codes"]), state["P_scale"].unsqueeze(-2), r, bits, mu, "column")
            R = dequantize(state["R_codes"], state["R_scale"].unsqueeze(-2), r, bits, mu, "column")
            M = M + P @ R.mT
    if "norm" in state:
        M = M * state["norm"].view(k, 1, 1)
    return M, R


def _store_momentum(
    state: dict,
    group: dict,
    layout: MatrixLayout,
    res: torch.Tensor,
    P: torch.Tensor | None,
    R: torch.Tensor | None,
    norm: torch.Tensor | None,
    index: int,
    step: int,
    row_max: RowSum,
) -> None:
    """Write the packed state: row-layout tensors are sharded like the parameter, the rest replicated."""
    bits, mu = group["bits"], float(group["mu"])
    if group["store_norm"] and norm is not None:
        state["norm"] = norm.flatten().float()  # (k,)
    if bits == 32:
        state["res"] = layout.to_rows(res).contiguous()
        if P is not None:
            state["P"], state["R"] = layout.to_rows(P).contiguous(), R.contiguous()
        return

    def rounding(kind: int) -> dict:
        if not group["stochastic_rounding"]:
            return {}
        return {"stochastic": True, "generator": _generator(group["seed"], index, step, kind)}

    granularity = _granularity(group)
    codes, scale = quantize(
        res, bits, mu, granularity, group["block_size"], group_max=row_max, **rounding(0)
    )  # (k, mp, w), (k, 1, 1) or (k, mp, nb)
    state["res_codes"] = layout.to_rows(codes).contiguous()
    state["res_scale"] = scale.flatten() if granularity == "matrix" else layout.to_rows(scale).contiguous()
    if P is not None:
        P_codes, P_scale = quantize(P, bits, mu, "column", group_max=row_max, **rounding(1))  # (k, mp, w), (k, 1, r)
        R_codes, R_scale = quantize(R, bits, mu, "column", **rounding(2))  # (k, np, w), (k, 1, r)
        state["P_codes"], state["P_scale"] = layout.to_rows(P_codes).contiguous(), P_scale.squeeze(-2)
        state["R_codes"], state["R_scale"] = R_codes.contiguous(), R_scale.squeeze(-2)
