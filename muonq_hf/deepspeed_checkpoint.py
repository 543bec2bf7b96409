"""Resume a DeepSpeed MuonQ run on another number of ranks, through a single-process MuonQ checkpoint.

DeepSpeed's own checkpoints (``engine.save_checkpoint``) resume on the same number of data-parallel ranks only:
each rank's file holds the packed momentum of the matrices it owns and its slices of the AdamW moments and of
the fp32 master weights. Another world size (2 -> 1, 1 -> 2, N -> M, any ZeRO stage to any other) goes through
the checkpoint one process would write (docs/distributed.md, DeepSpeed, "Another number of ranks"):

    full = consolidated_state(engine, model)        # collective; rank 0 gets {"model": ..., "optimizer": ...}
    if rank == 0:
        torch.save(full, "muonq_full.pt")
    ...                                             # a new run, any number of ranks, after deepspeed.initialize:
    load_consolidated_state(engine, model, torch.load("muonq_full.pt"))   # collective

``full["optimizer"]`` is what single-process ``MuonQ.state_dict()`` returns for the same param groups (packed
4-bit momentum per matrix, fp32 or 8-bit AdamW moments per parameter), ``full["model"]`` the fp32 master weights
by parameter name: one process resumes with ``model.load_state_dict`` and ``MuonQ.load_state_dict``. The packed
momentum moves as is (no decode / re-encode), so the resumed run continues with the same decoded state.

Each element of a weight or an AdamW moment lies in exactly one rank's partition (``deepspeed._fragment``): the
whole tensor is assembled by summing zero buffers that each rank filled with its elements (exact). Public
DeepSpeed APIs used: ``safe_get_local_fp32_param`` (ZeRO-3 partitions, through ``_fragment``) and
``zero.GatheredParameters`` (writing ZeRO-3 model weights); internals read: ZeRO 1/2's ``_hp_mapping`` (the
fragments, as every step does) and ZeRO-3's ``fp32_partitioned_groups_flat`` (which flat partition, the key of
the state, holds a parameter).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .backends.common import global_rank
from .checkpoint import CheckpointError, check_state_dict, storage_changes
from .deepspeed import DeepSpeedMuonQ, _dp_group, _fragment, _inside, _stage3, verify_engine
from .matrices import shaped
from .state import ADAMW_MOMENTS, owned_state, store_owned_state


def consolidated_state(engine: Any, model: torch.nn.Module) -> dict | None:
    """The single-process checkpoint of a DeepSpeed MuonQ run: {"model": fp32 weights by name, "optimizer": a
    ``MuonQ.state_dict()``} on rank 0 of the data-parallel group, None elsewhere. Collective."""
    opt = verify_engine(engine)
    names = {id(p): n for n, p in model.named_parameters()}
    pg = _dp_group(_all_params(opt))
    rank = dist.get_rank(pg)
    weights: dict[str, torch.Tensor] = {}
    state: dict[int, dict] = {}
    groups = []
    for g, group in enumerate(opt.param_groups):
        params = opt._lp_params(g)
        owner = {i: r for i, _, r in opt._owned(g, group)} if opt.owns_states(group) else {}
        groups.append({**{k: v for k, v in group.items() if k != "params"},
                       "params": [opt._index_base[g] + j for j in range(len(params))]})
        for j, p in enumerate(params):
            index, flat = opt._index_base[g] + j, _flat_of(engine.optimizer, opt, g, p)
            flat_state = opt.state.get(flat, {})
            weights[names[id(p)]] = _assemble(flat, p, flat, pg)
            if not p.requires_grad:
                continue
            if opt.owns_states(group):  # Muon, 8-bit AdamW: whole on its owner
                mine = [owned_state(flat_state, index) if owner[index] == rank else None]
                dist.broadcast_object_list(mine, src=global_rank(pg, owner[index]), group=pg)
                if mine[0]:  # copies: the owner's own tensors change in place at its next step
                    state[index] = {k: _copy(v) for k, v in mine[0].items()}
            elif "step" in flat_state:
                state[index] = {"step": flat_state["step"].clone().cpu()}
                for key in ADAMW_MOMENTS:
                    state[index][key] = _assemble(flat_state[key], p, flat, pg)
    model_state = _model_state(model, weights, names)  # collective for frozen ZeRO-3 parameters
    if rank != 0:
        return None
    optimizer = {"state": state, "param_groups": groups, "muonq": {"skipped_steps": opt.skipped_steps}}
    return {"model": model_state, "optimizer": optimizer}


def load_consolidated_state(engine: Any, model: torch.nn.Module, full: dict) -> None:
    """Load a single-process checkpoint (``consolidated_state``, or a one-process run's ``{"model":
    model.state_dict(), "optimizer": opt.state_dict()}``) into a DeepSpeed engine of any world size and ZeRO stage,
    after ``deepspeed.initialize``. Collective. The state is checked first (nothing changes on a refusal);
    each rank keeps the packed momentum of the matrices it owns now, and its slices of the rest."""
    opt = verify_engine(engine)
    sd, weights = full["optimizer"], full["model"]
    shaped_groups = [{**group, "params": [shaped(p) for p in opt._lp_params(g)]}
                     for g, group in enumerate(opt.param_groups)]
    check_state_dict(shaped_groups, opt.defaults, sd)
    for g, saved in enumerate(sd["param_groups"]):
        differ = storage_changes({**opt.defaults, **saved}, opt.param_groups[g])  # {option: (saved, now)}
        if differ:
            raise CheckpointError(f"load_consolidated_state: param group {g} was saved with other storage options "
                                  f"{differ} (saved, now); convert it in one process with MuonQ.load_state_dict")
    names = {id(p): n for n, p in model.named_parameters()}
    missing = [names[id(p)] for p in _all_params(opt) if names[id(p)] not in weights]
    if missing:
        raise CheckpointError(f"load_consolidated_state: the checkpoint has no weights for {missing[:3]}")
    pg = _dp_group(_all_params(opt))
    rank, world = dist.get_rank(pg), dist.get_world_size(pg)
    for g, group in enumerate(opt.param_groups):
        params = opt._lp_params(g)
        owner = {i: r for i, _, r in opt._owned(g, group)} if opt.owns_states(group) else {}
        for j, p in enumerate(params):
            index, flat = opt._index_base[g] + j, _flat_of(engine.optimizer, opt, g, p)
            flat_state = opt.state[flat]
            _write_weight(p, flat, weights[names[id(p)]])
            saved = sd["state"].get(sd["param_groups"][g]["params"][j], {})
            if not saved:
                continue
            if opt.owns_states(group):
                if owner[index] == rank:
                    store_owned_state(flat_state, index, {k: v.to(flat.device) if torch.is_tensor(v) else v
                                                          for k, v in saved.items()})
                continue
            flat_state["step"] = saved["step"].clone().float()  # one counter per flat partition, as the step keeps
            for key in ADAMW_MOMENTS:
                moment = flat_state.setdefault(key, torch.zeros_like(flat))
                _scatter(moment, p, flat, saved[key])
            flat_state["zero_world_size"] = world
    opt.skipped_steps = int(sd.get("muonq", {}).get("skipped_steps", 0))


# ----------------------------------------------------------------------------------------------- helpers
def _model_state(model: torch.nn.Module, weights: dict[str, torch.Tensor], names: dict[int, str]) -> dict:
    """``model.state_dict()``'s keys (tied aliases and buffers too) with the fp32 master weights of the trained
    parameters; other entries as the model holds them (ZeRO-3 partitioned ones gathered)."""
    out = {}
    for key, t in model.state_dict(keep_vars=True).items():
        if id(t) in names and names[id(t)] in weights:
            out[key] = weights[names[id(t)]]
        elif _stage3(t):
            import deepspeed

            with deepspeed.zero.GatheredParameters([t]):
                out[key] = t.detach().clone().cpu()
        else:
            out[key] = t.detach().clone().cpu()
    return out



def _copy(value: Any) -> Any:
    return value.detach().clone().cpu() if torch.is_tensor(value) else value


def _all_params(opt: DeepSpeedMuonQ) -> list[torch.Tensor]:
    return [p for g in range(len(opt.param_groups)) for p in opt._lp_params(g)]


def _flat_of(zero: Any, opt: DeepSpeedMuonQ, g: int, p: torch.Tensor) -> torch.Tensor:
    """The fp32 flat partition that holds this rank's part of p (the key of its state): ZeRO 1/2 keep it in the
    param group; ZeRO-3 has one per sub-group (``fp32_partitioned_groups_flat``, the one internal attribute read
    here) and empties the groups between steps."""
    if _stage3(p):
        from deepspeed.utils import safe_get_local_fp32_param

        local = safe_get_local_fp32_param(p)
        return next(flat for flat in zero.fp32_partitioned_groups_flat if _inside(local, flat))
    return opt.param_groups[g]["params"][0]


def _assemble(source: torch.Tensor, p: torch.Tensor, flat: torch.Tensor, pg: Any) -> torch.Tensor:
    """The whole fp32 tensor of p from ``source`` (laid out like ``flat``: the weights or a moment): each rank
    writes its elements into zeros, the sum over ranks is exact (one rank holds each element)."""
    whole = shaped(p)
    buf = torch.zeros(whole.numel(), dtype=torch.float32, device=flat.device)
    for lp, hp in _fragment(p, flat) or []:
        buf[lp] = source[hp].float()
    dist.all_reduce(buf, group=pg)
    return buf.view(whole.shape).cpu()


def _scatter(target: torch.Tensor, p: torch.Tensor, flat: torch.Tensor, value: torch.Tensor) -> None:
    """Write this rank's elements of the whole tensor ``value`` of p into ``target`` (laid out like ``flat``)."""
    value = value.reshape(-1).to(device=target.device, dtype=target.dtype)
    for lp, hp in _fragment(p, flat) or []:
        target[hp] = value[lp]


def _write_weight(p: torch.Tensor, flat: torch.Tensor, value: torch.Tensor) -> None:
    """The fp32 master (this rank's slice of ``flat``) and the model's weight (bf16 or fp32) of p."""
    with torch.no_grad():
        _scatter(flat, p, flat, value)
        if _stage3(p):
            import deepspeed

            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):  # rank 0's copy is partitioned back
                if dist.get_rank() == 0:
                    p.data.copy_(value.to(device=p.device, dtype=p.dtype))
        else:
            p.data.copy_(value.to(device=p.device, dtype=p.dtype).view(p.shape))
