"""MuonQ under DeepSpeed ZeRO stages 1, 2 and 3: Newton-Schulz on whole matrices recovered from flat partitions.

DeepSpeed replaces the params of the client optimizer's groups by flat 1-D fp32 partitions and calls its
``step()`` once per partition, on the reduced, unscaled and clipped gradient of that partition: ZeRO 1/2 one
partition per param group and rank (a Muon matrix may straddle partitions); ZeRO-3 one per sub-group and rank,
holding 1/world of every parameter (its other groups are emptied meanwhile). ``DeepSpeedMuonQ`` keeps the
matrix structure this way:

1. Each Muon matrix has an owner rank (``backends.common.assign_owners``, balanced by state bytes). The owner
   receives the matrix's whole reduced gradient: every rank writes the elements of its partition into a zero
   buffer at the matrix's offsets and the buffers are summed onto the owner (``dist.reduce``; exactly one rank
   holds each element, so the sum is exact).
2. The owner runs the momentum and orthogonalize stages on it (``whole_muon_update``): the packed 4-bit
   momentum of that matrix lives only on its owner (under ``m{i}.`` keys of its flat partition's state), so
   MuonQ's state is partitioned across ranks by whole matrices; NS5 runs once per matrix in the world.
3. The owner broadcasts the orthogonalized update; each rank applies the elementwise part (decoupled weight
   decay, ``- lr * 0.2 sqrt(max(m, n)) * U``) to its own fp32 master fragment.

AdamW groups with fp32 moments are elementwise and run on the flat partitions directly. With ``adamw_bits=8`` the
moments' blocks run along the rows of each tensor, which a flat partition may cut: every tensor of such a group
is stepped whole by an owner, like a Muon matrix (``_zero_owned_adamw_step``: the whole gradient and fp32 master
weight reduced onto the owner, the one-process ``adamw_step``, the new weight broadcast), its state under ``m{i}.``
keys; the values are single-process MuonQ's, bit for bit. DeepSpeed calls ``step()`` only at the
gradient-accumulation boundary, so NS5 runs once per optimizer step, never per micro-batch.

Where a parameter's slice sits in a flat partition (``_fragment``): ZeRO 1/2 keep it in each parameter's
``_hp_mapping`` (``lp_fragment_address``/``hp_fragment_address``), the mapping that backs DeepSpeed's public
``safe_get_full_grad``/``safe_get_full_fp32_param`` and universal checkpoints, stable since 0.10. ZeRO-3 rank k
holds elements [k s, k s + s) of every parameter (s = ``partition_numel()``), and the public
``safe_get_local_fp32_param`` returns a view of them inside the flat partition. Models built under
``zero.Init`` hold empty tensors: shapes come from ``ds_shape`` (``matrices.shaped``).

Why not DeepSpeed's native Muon path (0.18+, ``MuonWithAuxAdam``)? It runs the Muon update inside
``stage_1_and_2.py``'s gradient flattening, gated by ``p.use_muon`` and by the optimizer class name; the
surrounding code (momentum staging, split-matrix all-reduce, the offload path, loss-scale bookkeeping) has been
rewritten release after release and keeps an fp32 flat momentum that a 4-bit codec cannot plug into. We never
set ``p.use_muon``; ``DeepSpeedMuonQ`` refuses parameters that carry it, since DeepSpeed would then run its own
Muon on them first (its name test, ``'muon' in class name``, matches ``MuonQ``). The native path's record also
shows why a separate, tested path is worth it: it silently ran no Newton-Schulz at ZeRO stage 0
(deepspeedai/DeepSpeed#8441) and under ``zero.Init`` at stage 3 (#8438), and its routing by ``p.ndim >= 2``
minus name keywords gives GPT-2's ``wte``/``wpe`` to Muon; MuonQ's routing stays in its groups.

Checkpoints resume on the same number of data-parallel ranks; ``muonq_hf.deepspeed_checkpoint`` moves a run to
another one. Anything else stops at start-up (``check_deepspeed_config``, ``verify_engine``): ZeRO 0, fp16,
optimizer or parameter offload (Accelerate would swap the optimizer for DeepSpeed's CPU Adam), a DeepSpeed
``optimizer`` section, elastic or universal checkpoints, round-robin gradients, ZenFlow.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist

from .adamw import adamw_step
from .backends.common import all_finite, assign_owners, global_rank, state_cost, whole_muon_update
from .checkpoint import CheckpointError
from .matrices import shaped
from .momentum import apply_update
from .optimizer import MuonQ
from .state import adamw_quantized, owned_indices, owned_state, store_owned_state

SUPPORTED_STAGES = (1, 2, 3)


class DeepSpeedConfigError(ValueError):
    """A DeepSpeed setting MuonQ does not support; the message names it and the supported alternatives."""


def _get(config: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def _enabled(section: Any) -> bool:
    if isinstance(section, Mapping):
        return section.get("enabled", False) in (True, "true", "True")  # "auto" stays off until resolved
    return False


def check_deepspeed_config(config: Mapping[str, Any]) -> None:
    """Raise ``DeepSpeedConfigError`` for every DeepSpeed setting under which MuonQ cannot run as itself.

    Supported: ZeRO stage 1, 2 or 3, bf16 or fp32, no offload, rigid (default) checkpoints. ``config`` is the
    DeepSpeed config dict (as in ``ds_config.json``); ``"auto"`` values are accepted where they cannot select
    an unsupported mode.
    """
    stage = _get(config, "zero_optimization.stage", 0)
    if stage not in SUPPORTED_STAGES:
        raise DeepSpeedConfigError(
            f"MuonQ under DeepSpeed: zero_optimization.stage={stage!r} is not supported; use stage 1, 2 or 3 "
            "(without ZeRO, use plain DDP (torchrun) or FSDP2 instead of DeepSpeed)"
        )
    if _enabled(config.get("fp16")):
        raise DeepSpeedConfigError(
            "MuonQ under DeepSpeed: fp16.enabled=true is not supported (dynamic loss scaling); "
            "use bf16.enabled=true or fp32 (no fp16/bf16 section)"
        )
    for key in ("offload_optimizer", "offload_param"):
        device = _get(config, f"zero_optimization.{key}.device", "none")
        if device not in (None, "none"):
            raise DeepSpeedConfigError(
                f"MuonQ under DeepSpeed: zero_optimization.{key}.device={device!r} is not supported (with optimizer "
                "offload DeepSpeed/Accelerate replace the client optimizer by DeepSpeed's CPU Adam); remove the "
                f"{key} section or set its device to 'none'"
            )
    if "optimizer" in config:
        name = _get(config, "optimizer.type")
        raise DeepSpeedConfigError(
            f"MuonQ under DeepSpeed: the config has an 'optimizer' section (type={name!r}), so DeepSpeed would "
            "build its own optimizer instead of MuonQ; remove the section and pass MuonQ as the client optimizer "
            "(Trainer: --optim muonq)"
        )
    for dotted, hint in (
        ("zero_optimization.elastic_checkpoint", "its merged flat state cannot hold per-matrix packed state"),
        ("zero_optimization.round_robin_gradients", "MuonQ needs DeepSpeed's plain parameter order"),
        ("checkpoint.load_universal", "universal checkpoints know only flat optimizer state"),
    ):
        if _get(config, dotted, False) in (True, "true", "True"):
            raise DeepSpeedConfigError(
                f"MuonQ under DeepSpeed: {dotted}=true is not supported ({hint}); set it to false"
            )
    if _get(config, "zero_optimization.zenflow") is not None:
        raise DeepSpeedConfigError(
            "MuonQ under DeepSpeed: zero_optimization.zenflow is not supported (it runs its own CPU optimizer); "
            "remove the zenflow section"
        )


def _muon_attr_params(params: Iterable[torch.Tensor]) -> list[tuple[int, ...]]:
    return [tuple(p.shape) for p in params if getattr(p, "use_muon", False)]


class DeepSpeedMuonQ(MuonQ):
    """``MuonQ`` that runs as the client optimizer of DeepSpeed ZeRO 1, 2 or 3 (see the module docstring).

    Built exactly like ``MuonQ`` (same param groups and options). Before DeepSpeed takes the parameters it
    records, per group, weak references to them and their position in the optimizer, which fixes each
    matrix's index (its first-step seed, as in single-process MuonQ) and owner rank. Outside ZeRO (param
    groups still hold the real parameters) it is plain ``MuonQ``. ``ns_calls`` counts matrices orthogonalized
    on this rank.
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict], lr: float = 0.02, **options: Any) -> None:
        super().__init__(params, lr, **options)
        bad = _muon_attr_params(p for g in self.param_groups for p in g["params"])
        if bad:
            raise ValueError(
                f"DeepSpeedMuonQ: {len(bad)} parameter(s) carry use_muon=True (shapes {bad[:3]}...): DeepSpeed's "
                "native Muon would orthogonalize their gradients before MuonQ sees them. Delete the attribute "
                "(routing lives in MuonQ's param groups: muonq_hf.param_groups(model))"
            )
        if getattr(self, "ddp_shard_state", False):
            raise ValueError(
                "DeepSpeedMuonQ: ddp_shard_state=True is for DDP; under ZeRO the packed state is already partitioned "
                "by matrix across ranks: drop ddp_shard_state"
            )
        if self.cuda_graph:
            raise ValueError(
                "DeepSpeedMuonQ: cuda_graph=True is not supported under DeepSpeed ZeRO (each step exchanges partitions "
                "between ranks, which a recorded step cannot do); pass cuda_graph=False"
            )
        self._lp_refs = [[weakref.ref(p) for p in g["params"]] for g in self.param_groups]
        self._index_base = [0]
        for refs in self._lp_refs:
            self._index_base.append(self._index_base[-1] + len(refs))
        self._refresh_group_ids()
        self.ns_calls = 0

    def _refresh_group_ids(self) -> None:
        self._group_ids = {id(g): i for i, g in enumerate(self.param_groups)}

    def _check_loaded(self, state_dict: dict) -> None:
        """Refuse a checkpoint of another data-parallel world size or owner assignment (nothing changes); outside
        ZeRO, MuonQ's checks (under ZeRO the flat partitions' "m{i}." entries are checked by DeepSpeed's loader)."""
        params = [ref() for refs in self._lp_refs for ref in refs if ref() is not None]
        world = dist.get_world_size(_dp_group(params)) if dist.is_initialized() else 1
        for state in state_dict.get("state", {}).values():
            saved = state.get("zero_world_size")
            if saved is not None and int(saved) != world:
                raise RuntimeError(
                    f"DeepSpeedMuonQ: this checkpoint was written with a data-parallel world size of {int(saved)}, "
                    f"now it is {world}: MuonQ's packed momentum is owned per matrix by one rank, so resume with "
                    f"{int(saved)} ranks, or move the run through muonq_hf.deepspeed_checkpoint (consolidated_state "
                    "on the old ranks, load_consolidated_state on the new ones; docs/distributed.md, DeepSpeed)"
                )
        self._check_owners(state_dict)
        if not self._under_zero():
            super()._check_loaded(state_dict)

    def _checks_parameters(self) -> bool:
        return not self._under_zero()

    def _after_load(self) -> None:
        self._refresh_group_ids()  # torch's loader builds new group dicts

    def _check_owners(self, state_dict: dict) -> None:
        """Under ZeRO each rank's flat state holds the Muon states of the matrices it owns: refuse a state whose
        matrices another rank owns now (another owner assignment), which would silently restart their momentum."""
        if not self._under_zero():
            return
        for g, (saved, group) in enumerate(zip(state_dict.get("param_groups", []), self.param_groups, strict=False)):
            index = self._group_ids.get(id(group))
            flat_states = [state_dict["state"].get(i, {}) for i in saved.get("params", [])]  # ZeRO-3: per sub-group
            if index is None or not self.owns_states(group) or not any(flat_states):
                continue
            mine = {i for i, _, r in self._owned(index, group) if r == self._rank(index)}
            foreign = set().union(*map(owned_indices, flat_states)) - mine
            if foreign:
                raise CheckpointError(
                    f"DeepSpeedMuonQ.load_state_dict: param group {g} of this rank's checkpoint holds the Muon state "
                    f"of matrices {sorted(foreign)}, which another rank owns now (this rank owns {sorted(mine)}): "
                    "the checkpoint was written with another owner assignment; nothing was changed"
                )

    # ------------------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        if not self._under_zero():
            return super().step(closure)
        if closure is not None:
            raise ValueError("DeepSpeedMuonQ under ZeRO: DeepSpeed does not pass a closure; call engine.step()")
        self._check_groups(params=False)  # options as the constructor checks them (flat partitions are DeepSpeed's)
        for group in self.param_groups:  # ZeRO 1/2 narrow param_groups to the stepped group; ZeRO-3 empties the others
            if group["params"]:
                self._zero_group_step(group)
        return None

    def _under_zero(self) -> bool:
        """True when ZeRO has replaced each (visible) group's parameters by one flat partition of its own (ZeRO-3
        steps one sub-group at a time and leaves the other groups empty)."""
        stepped = [group for group in self.param_groups if group["params"]]
        for group in stepped:  # (ZeRO-3 also puts all of a group's sub-group partitions in it to save and load)
            index = self._group_ids.get(id(group))
            if index is None:
                return False
            real = {id(ref()) for ref in self._lp_refs[index]}
            if any(flat.ndim != 1 or id(flat) in real for flat in group["params"]):
                return False  # a real parameter (a matrix, or a bias / norm) of a plain, non-ZeRO run
        return bool(stepped)

    def _lp_params(self, index: int) -> list[torch.Tensor]:
        params = [ref() for ref in self._lp_refs[index]]
        if any(p is None for p in params):
            raise RuntimeError(
                "DeepSpeedMuonQ: a parameter of the model was freed or replaced after the optimizer was built; "
                "build the optimizer on the model that is passed to deepspeed.initialize"
            )
        return params

    def _zero_group_step(self, group: dict) -> None:
        index = self._group_ids.get(id(group))
        if index is None:
            raise RuntimeError("DeepSpeedMuonQ: a param group was added after DeepSpeed took the optimizer")
        flat = group["params"][0]  # (partition_size,) fp32 master partition of this rank
        if flat.grad is None:
            return
        params = self._lp_params(index)
        if not all_finite([flat.grad], _dp_group(params), agree=True):  # every rank takes the same branch
            if self.nonfinite == "error":
                raise FloatingPointError(
                    "MuonQ: non-finite gradient (inf or nan) found before the step of a param group; this group was "
                    "not changed. Lower the lr, enable gradient clipping, or pass nonfinite='skip'"
                )
            self.skipped_steps += 1
            return
        if group["use_muon"]:
            self._zero_muon_step(flat, group, index, params)
        elif self.owns_states(group):  # 8-bit moments: blocks of whole rows, stepped whole on owners
            self._zero_owned_adamw_step(flat, group, index, params)
        else:  # elementwise: the flat partition is as good as the parameters
            adamw_step(flat, flat.grad, self.state[flat], group, quantized=False)
        self.state[flat]["zero_world_size"] = dist.get_world_size(_dp_group(params))

    @staticmethod
    def owns_states(group: dict) -> bool:
        """Whether the tensors of ``group`` keep their state whole on owner ranks (``m{i}.`` keys of a flat
        partition's state): Muon groups, and AdamW groups with 8-bit moments, whose blocks run along rows that a
        flat partition may cut. Other AdamW groups keep fp32 moments laid out like their flat partitions."""
        return bool(group["use_muon"]) or group["adamw_bits"] == 8

    def _zero_owned_adamw_step(self, flat: torch.Tensor, group: dict, index: int, params: list[torch.Tensor]) -> None:
        """AdamW with 8-bit moments: each tensor's owner takes the one-process ``adamw_step`` on its whole gradient
        and fp32 master weight (the single-process values, bit for bit) and sends the new weight back."""

        def step(i: int, state: dict, grad: torch.Tensor, weight: torch.Tensor) -> None:
            adamw_step(weight, grad, state, group, adamw_quantized(tuple(weight.shape), group))  # weight in place

        def take(part: slice, weight: torch.Tensor) -> None:
            flat[part] = weight

        self._on_owners(flat, group, index, params, [flat.grad, flat], step, take)

    def _rank(self, index: int) -> int:
        return dist.get_rank(_dp_group(self._lp_params(index)))

    def _owned(self, index: int, group: dict) -> list[tuple[int, torch.Tensor, int]]:
        """(matrix index, parameter, owner rank) of the trainable matrices of param group ``index``: the owners
        balance state bytes (``assign_owners``), the same on every rank."""
        params = self._lp_params(index)
        world = dist.get_world_size(_dp_group(params))
        matrices = [(self._index_base[index] + j, p) for j, p in enumerate(params) if p.requires_grad]
        owners = assign_owners([state_cost(tuple(shaped(p).shape), group) for _, p in matrices], world)
        return [(i, p, r) for (i, p), r in zip(matrices, owners, strict=True)]

    def _zero_muon_step(self, flat: torch.Tensor, group: dict, index: int, params: list[torch.Tensor]) -> None:
        """Muon: each matrix's owner runs momentum and orthogonalize on its whole gradient and sends the update back;
        each rank applies it to its fp32 master fragment."""

        def step(i: int, state: dict, grad: torch.Tensor) -> None:
            grad.copy_(whole_muon_update(self.momentum_stage, grad, state, group, i).reshape(grad.shape))
            self.ns_calls += 1

        def take(part: slice, update: torch.Tensor) -> None:
            apply_update(flat[part], update, group["lr"], group["weight_decay"])  # the ops of every backend

        self._on_owners(flat, group, index, params, [flat.grad], step, take)

    def _on_owners(
        self, flat: torch.Tensor, group: dict, index: int, params: list[torch.Tensor], sources: list[torch.Tensor],
        step: Callable[..., None], take: Callable[[slice, torch.Tensor], None],
    ) -> None:
        """The owner exchange of the tensors whose state lives whole on one rank (``owns_states``), owner by owner:

        1. each rank writes its elements of every flat ``source`` (the gradient; the fp32 master weights) into
           zeros, and the sum onto the owner is exact (one rank holds each element);
        2. the owner runs ``step(i, state, *wholes)`` on each tensor it owns, its state under ``m{i}.`` keys, which
           leaves the result in the last source's place (an update over the gradient, a new weight in place);
        3. the result is broadcast and every rank passes its elements to ``take(slice of flat, values)``.
        ZeRO-3 steps a group in sub-groups: only the tensors of this flat partition (the same on every rank)."""
        pg = _dp_group(params)
        world, rank = dist.get_world_size(pg), dist.get_rank(pg)
        fragments = {id(p): _fragment(p, flat) for p in params}
        tensors = [m for m in self._owned(index, group) if not _stage3(m[1]) or fragments[id(m[1])] is not None]
        state = self.state[flat]
        for owner in range(world):
            owned = [(i, p) for i, p, r in tensors if r == owner]
            if not owned:
                continue
            offsets = _offsets([shaped(p).numel() for _, p in owned])
            buf = torch.zeros(len(sources), offsets[-1], dtype=torch.float32, device=flat.device)  # (sources, total)
            for (_, p), start in zip(owned, offsets, strict=False):
                for lp_slice, hp_slice in fragments[id(p)] or []:
                    for whole, source in zip(buf, sources, strict=True):
                        whole[start + lp_slice.start : start + lp_slice.stop] = source[hp_slice]
            dist.reduce(buf, dst=global_rank(pg, owner), group=pg)
            if rank == owner:
                for (i, p), start, end in zip(owned, offsets[:-1], offsets[1:], strict=True):
                    owned_entries = owned_state(state, i)
                    step(i, owned_entries, *(whole[start:end].view(shaped(p).shape) for whole in buf))
                    store_owned_state(state, i, owned_entries)
            result = buf[-1]
            dist.broadcast(result, src=global_rank(pg, owner), group=pg)
            for (_, p), start in zip(owned, offsets, strict=False):
                for lp_slice, hp_slice in fragments[id(p)] or []:
                    take(hp_slice, result[start + lp_slice.start : start + lp_slice.stop])


def _offsets(sizes: list[int]) -> list[int]:
    out = [0]
    for s in sizes:
        out.append(out[-1] + s)
    return out


def _stage3(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")  # a parameter partitioned by ZeRO-3


def _fragment(p: torch.Tensor, flat: torch.Tensor) -> list[tuple[slice, slice]] | None:
    """(slice of the flattened parameter, slice of the flat partition ``flat``) held by this rank; [] if none.

    ZeRO 1/2: the parameter's ``_hp_mapping``. ZeRO-3: rank k holds elements [k s, k s + s) of every parameter
    (s = ``partition_numel()``, the last rank's tail padded), found in the flat partition through DeepSpeed's
    public ``safe_get_local_fp32_param`` (a view into it); None when the parameter belongs to another sub-group
    (another flat partition).
    """
    if _stage3(p):
        from deepspeed.utils import safe_get_local_fp32_param

        local = safe_get_local_fp32_param(p)  # (s,) view of this rank's fp32 partition of p
        if local is None or not _inside(local, flat):
            return None
        size = p.partition_numel()
        first = dist.get_rank(p.ds_process_group) * size
        count = max(0, min(size, p.ds_numel - first))  # the padding past the parameter's end is not p's
        start = local.storage_offset() - flat.storage_offset()
        return [(slice(first, first + count), slice(start, start + count))] if count else []
    mapping = getattr(p, "_hp_mapping", None)
    if mapping is None:
        return []
    lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
    return [(slice(lp.start, lp.start + lp.numel), slice(hp.start, hp.start + hp.numel))]


def _inside(view: torch.Tensor, flat: torch.Tensor) -> bool:
    """Whether ``view`` lies within ``flat`` (ZeRO-3's sub-group partitions may share one storage)."""
    start = view.storage_offset() - flat.storage_offset()
    same = view.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
    return same and 0 <= start and start + view.numel() <= flat.numel()


def _dp_group(params: list[torch.Tensor]) -> Any:
    if not params:
        return None
    return params[0].ds_process_group if _stage3(params[0]) else getattr(params[0], "_dp_group", None)


def verify_engine(engine: Any) -> DeepSpeedMuonQ:
    """Check that the optimizer DeepSpeed will step is our ``DeepSpeedMuonQ`` under ZeRO 1, 2 or 3; return it.

    Catches what a config check cannot: Accelerate swapping the client optimizer (offload), a DeepSpeed-built
    optimizer, or a plain ``MuonQ`` that would see flat partitions.
    """
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    zero = getattr(engine, "optimizer", None)
    stage = engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else None
    expected = DeepSpeedZeroOptimizer_Stage3 if stage == 3 else DeepSpeedZeroOptimizer
    if not isinstance(zero, expected) or stage not in SUPPORTED_STAGES:
        raise DeepSpeedConfigError(
            f"MuonQ under DeepSpeed: the engine runs {type(zero).__name__} at zero_optimization.stage={stage!r}; "
            "MuonQ supports ZeRO stage 1 or 2 (DeepSpeedZeroOptimizer) and 3 (DeepSpeedZeroOptimizer_Stage3)"
        )
    client = zero.optimizer
    if not isinstance(client, DeepSpeedMuonQ):
        raise DeepSpeedConfigError(
            f"MuonQ under DeepSpeed: the optimizer DeepSpeed steps is {type(client).__name__}, not DeepSpeedMuonQ "
            "(optimizer offload swaps it for DeepSpeedCPUAdam; a plain MuonQ cannot read flat partitions); build "
            "muonq_hf.deepspeed.DeepSpeedMuonQ and keep zero_optimization.offload_optimizer off"
        )
    return client


def deepspeed_config_of(args: Any = None) -> dict | None:
    """The DeepSpeed config a Trainer run will use, or None without DeepSpeed.

    From ``TrainingArguments`` (``--deepspeed``: its resolved ``hf_deepspeed_config``, a dict or a JSON path),
    else from ``accelerate launch`` with a DeepSpeed config (the ``ACCELERATE_*`` environment it sets).
    """
    import json
    import os

    source = getattr(args, "deepspeed", None)
    if source:
        resolved = getattr(args, "hf_deepspeed_config", None)
        if resolved is not None:
            return dict(resolved.config)
        if isinstance(source, Mapping):
            return dict(source)
        with open(source) as f:
            return json.load(f)
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if path and path != "none":
        with open(path) as f:
            return json.load(f)
    stage = int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))
    zero: dict[str, Any] = {"stage": stage}
    for key, env in (("offload_optimizer", "OFFLOAD_OPTIMIZER"), ("offload_param", "OFFLOAD_PARAM")):
        zero[key] = {"device": os.environ.get(f"ACCELERATE_DEEPSPEED_{env}_DEVICE", "none")}
    precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    return {"zero_optimization": zero, **({precision: {"enabled": True}} if precision in ("fp16", "bf16") else {})}


def trainer_optimizer_cls(args: Any = None) -> type[MuonQ]:
    """The class ``--optim muonq`` builds: ``DeepSpeedMuonQ`` under DeepSpeed (after ``check_deepspeed_config``,
    so an unsupported setting stops the run before training), else ``MuonQ``."""
    config = deepspeed_config_of(args)
    if config is None:
        return MuonQ
    check_deepspeed_config(config)
    return DeepSpeedMuonQ


def initialize(
    model: torch.nn.Module, optimizer: DeepSpeedMuonQ, config: Mapping[str, Any], **kwargs: Any
) -> tuple[Any, ...]:
    """``deepspeed.initialize`` with MuonQ's start-up checks before and after it; same return value."""
    import deepspeed

    if not isinstance(optimizer, DeepSpeedMuonQ):
        raise TypeError(
            f"muonq_hf.deepspeed.initialize needs a DeepSpeedMuonQ, got {type(optimizer).__name__}; build it like "
            "MuonQ: DeepSpeedMuonQ(muonq_hf.param_groups(model), lr=...)"
        )
    check_deepspeed_config(config)
    config = {**config, "zero_allow_untested_optimizer": True}  # DeepSpeed's gate for any client optimizer
    out = deepspeed.initialize(model=model, optimizer=optimizer, config=config, **kwargs)
    verify_engine(out[0])
    return out


__all__ = [
    "DeepSpeedConfigError",
    "DeepSpeedMuonQ",
    "check_deepspeed_config",
    "deepspeed_config_of",
    "initialize",
    "trainer_optimizer_cls",
    "verify_engine",
]
