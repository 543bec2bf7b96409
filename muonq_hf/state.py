"""The optimizer state of one parameter: its schema, its layout and its codec (docs/design.md, "State layout").

``QuantizedMomentum(plan, group)`` owns the state of a Muon parameter: the key names, the shape and dtype of
every entry, which entries are row entries (sharded with the weight's rows, padded with zero codes) and which
are per-matrix batch entries, the conversion between that layout and the pieces of one batch of same-shape
matrices, and the encode / decode of a batch's momentum (residual codes, the P R^T factors, scales, norm).
The AdamW state (fp32 or blockwise 8-bit moments) has its schema here too, so that ``state_schema`` answers
for every parameter; ``muonq_hf.memory`` counts bytes from it and ``muonq_hf.checkpoint`` checks against it.

The checkpoint format is plain tensors under these keys; DeepSpeed ZeRO keeps the Muon states of the matrices
a rank owns in its flat partition's state under ``m{i}.`` prefixes (``owned_state`` / ``store_owned_state``).
"""

from __future__ import annotations

import math

import torch

from .codecs import (
    DynamicCodebook,
    code_points,
    dequantize,
    dynamic_codebook,
    group_absmax,
    group_scale,
    nearest_code_bytes,
    packed_width,
    quantize,
    store_codes,
)
from .kernels import fused
from .keyed import generator
from .lowrank import RowSum, no_reduction, product, rank_for, residual
from .matrices import MatrixPlan, base_key, batch_key, plan_of
from .weights import KAHAN, LOW_PRECISION

ZERO_CODE = {4: 0x88, 8: 0}  # the byte of two 4-bit zero codes / one 8-bit zero code
ADAMW_8BIT_MIN_NUMEL = 4096  # like bitsandbytes' min_8bit_size: tiny tensors keep fp32 moments
ADAMW_8BIT_BLOCK = 256
ADAMW_MOMENTS = ("exp_avg", "exp_avg_sq")
F32, U8 = torch.float32, torch.uint8
Schema = dict[str, tuple[tuple[int, ...], torch.dtype]]


def scale_dtype(group: dict) -> torch.dtype:
    """fp16 scales hold normalized momenta (|values| <= 1); without normalization the momentum is unbounded
    (gradients of ~3e4 overflowed fp16's 65504 into NaN weights), so its scales are fp32 (2 more bytes each)."""
    return torch.float16 if group["normalize"] else torch.float32


def combine(res: torch.Tensor, low_rank: torch.Tensor | None, norm: torch.Tensor | None) -> torch.Tensor:
    """The momentum from its stored parts: (res + P R^T) * norm; a bf16 P R^T is promoted on the fly."""
    M = res if low_rank is None else res + low_rank
    return M if norm is None else M * norm


def _residual_absmax(M: torch.Tensor, low_rank: torch.Tensor | None, granularity: str,
                     block_size: int | None) -> torch.Tensor:
    return group_absmax(residual(M, low_rank), granularity, block_size)


def _residual_code_bytes(M: torch.Tensor, low_rank: torch.Tensor | None, points: torch.Tensor, bits: int, mu: float,
                         granularity: str, block_size: int | None) -> torch.Tensor:
    return nearest_code_bytes(residual(M, low_rank), points, bits, mu, granularity, block_size)


# One process, round to nearest: the residual M - P R^T is formed inside the two passes of its encode (max, then
# codes) and never stored in fp32. Two kernels, with the fp16 scale rounded and the code points computed between
# them: inductor's C++ backend does not vectorize a loop that mixes bf16 (P R^T) and fp16 (the scale), 4x slower.
_residual_absmax_fused = fused(_residual_absmax)
_residual_code_bytes_fused = fused(_residual_code_bytes)


# ------------------------------------------------------------------------------------------- AdamW
def adamw_quantized(shape: tuple[int, ...], group: dict) -> bool:
    """The one rule for 8-bit AdamW moments: adamw_bits=8 and a matrix of >= 4096 elements."""
    return group["adamw_bits"] == 8 and len(shape) >= 2 and math.prod(shape) >= ADAMW_8BIT_MIN_NUMEL


def moment_codebook(key: str, device: torch.device | str) -> DynamicCodebook:
    """The dynamic map of an AdamW moment: m (``exp_avg``) is signed, v (``exp_avg_sq``) is not."""
    return dynamic_codebook(signed=key == "exp_avg", device=device)


def adamw_schema(shape: tuple[int, ...], group: dict) -> Schema:
    """AdamW state: fp32 m and v of the parameter's shape, or (rows, cols) codes + one absmax per block of 256."""
    out: Schema = {"step": ((), F32)}
    if adamw_quantized(shape, group):
        rows, cols = shape[0], math.prod(shape) // shape[0]
        for key in ADAMW_MOMENTS:
            out[f"{key}_codes"] = ((rows, cols), U8)
            out[f"{key}_absmax"] = ((rows, -(-cols // ADAMW_8BIT_BLOCK)), F32)
    else:
        for key in ADAMW_MOMENTS:
            out[key] = (tuple(shape), F32)
    return out


# -------------------------------------------------------------------------------------------- Muon
class QuantizedMomentum:
    """The MuonQ momentum state of one Muon parameter with matrix plan ``plan`` and options ``group``.

    Row entries (``res_codes``, ``P_codes``, fp32 ``res``/``P``, blockwise ``res_scale``) are (m, W), or
    (E, m, W) for a stacked plan; batch entries (per-matrix ``res_scale``, ``P_scale``, ``R_codes``,
    ``R_scale``, fp32 ``R``, ``norm``) are (c, ...) or (E, c, ...), batch b >= 1 under ``b{b}.``.
    """

    def __init__(self, plan: MatrixPlan, group: dict) -> None:
        self.plan, self.group = plan, group
        self.bits, self.mu = group["bits"], float(group["mu"])
        self.block_size = group["block_size"]
        self.granularity = "matrix" if self.block_size is None else "block"
        # the P R^T split's large products: bf16 inputs when P, R and the residual are stored in 4 or 8 bits
        self.product_dtype = torch.float32 if self.bits == 32 else torch.bfloat16

    @classmethod
    def of(cls, shape: tuple[int, ...], group: dict) -> QuantizedMomentum:
        return cls(plan_of(torch.empty(shape, device="meta"), group), group)

    # ------------------------------------------------------------------------------------ entries
    def rank(self, b: int) -> int:
        """r of the P R^T split of batch b's matrices (0: no split)."""
        return rank_for(*self.plan.batch_shape(b), self.group["rank_divisor"])

    def is_row(self, key: str) -> bool:
        """Whether state entry ``key`` is a row entry (sharded with the weight's rows)."""
        return key in ("res_codes", "P_codes", "res", "P") or (key == "res_scale" and self.block_size is not None)

    def fill(self, key: str) -> float:
        """The pad value of a row entry: the zero code for codes, else 0."""
        return float(ZERO_CODE[self.bits]) if key.endswith("_codes") else 0.0

    def widths(self, key: str) -> list[int]:
        """Width of each piece's part of the row entry ``key``."""
        return [self._piece_width(key, *self.plan.piece_shape(j)) for j in range(self.plan.k)]

    def _piece_width(self, key: str, rows: int, cols: int) -> int:
        r = rank_for(rows, cols, self.group["rank_divisor"])
        if key in ("res_codes", "P_codes"):
            return packed_width(cols if key == "res_codes" else r, self.bits)
        if key == "res_scale":  # blockwise scales: one per block of each row
            return -(-cols // self.block_size)
        return cols if key == "res" else r  # fp32 residual / P

    def schema(self) -> Schema:
        """Every state entry (key -> shape, dtype) after a step."""
        plan, bits, S = self.plan, self.bits, scale_dtype(self.group)
        lead = (plan.experts,) if plan.stacked else ()
        out: Schema = {"step": ((), F32)}
        row_keys = ("res", "P") if bits == 32 else ("res_codes", "P_codes")
        if bits != 32 and self.block_size is not None:
            row_keys += ("res_scale",)
        for key in row_keys:
            widths = self.widths(key)
            if any(widths):
                dtype = F32 if bits == 32 else (S if "scale" in key else U8)
                out[key] = ((*lead, plan.m, plan.row_width(widths)), dtype)
        for b, pieces in enumerate(plan.batches):
            cols, r, c = plan.batch_shape(b)[1], self.rank(b), (*lead, len(pieces))
            entries: Schema = {}
            if bits == 32:
                if r:
                    entries["R"] = ((*c, cols, r), F32)
            else:
                if self.block_size is None:
                    entries["res_scale"] = (c, S)
                if r:
                    entries.update(
                        P_scale=((*c, r), S), R_codes=((*c, cols, packed_width(r, bits)), U8), R_scale=((*c, r), S)
                    )
            if self.group["store_norm"] and self.group["normalize"]:
                entries["norm"] = (c, F32)
            out.update({batch_key(k, b): v for k, v in entries.items()})
        return out

    # ------------------------------------------------------------------------- pieces <-> layout
    def _lead(self, t: torch.Tensor) -> torch.Tensor:
        """A stored entry with the expert dim in front: plain plans keep no expert dim in their state."""
        return t if self.plan.stacked else t.unsqueeze(0)

    def load(self, state: dict, b: int, start: int = 0, count: int | None = None) -> dict[str, torch.Tensor]:
        """Batch b's entries as pieces (E * c, ...) from a parameter's state (local rows [start, start + count))."""
        prefix = "" if b == 0 else f"b{b}."
        out: dict[str, torch.Tensor] = {}
        if "step" not in state:  # before the first step (row entries may already hold an earlier batch's pieces)
            return out
        for key, value in state.items():
            if key in ("step", KAHAN) or not torch.is_tensor(value):  # (the weight's Kahan buffer: not momentum)
                continue
            if self.is_row(key):
                out[key] = self.plan.take_rows(self._lead(value), b, self.widths(key), self.fill(key), start, count)
            elif (key.startswith(prefix) and "." not in key[len(prefix) :]) if prefix else "." not in key:
                out[base_key(key)] = self._lead(value).flatten(0, 1)  # (E, c, ...) -> (E * c, ...)
        return out

    def store(
        self, state: dict, b: int, pieces: dict, start: int = 0, count: int | None = None, in_place: bool = False
    ) -> None:
        """Write batch b's pieces back into the parameter's state (row entries are created on first use). Row
        entries are written in place; batch entries too with ``in_place`` (a ``banks.StateBank``, whose members
        hold views of them), else they are replaced."""
        plan = self.plan
        for key, value in pieces.items():
            if self.is_row(key):
                widths = self.widths(key)
                if key not in state:
                    rows = (plan.m if count is None else count, plan.row_width(widths))  # local rows, W
                    experts = value.size(0) // len(plan.batches[b])
                    state[key] = value.new_full((experts, *rows) if plan.stacked else rows, self.fill(key))
                plan.put_rows(self._lead(state[key]), b, widths, value, start, count)
            else:
                stored = value.unflatten(0, (-1, len(plan.batches[b])))  # (E, c, ...)
                stored = stored if plan.stacked else stored[0]
                key_b = batch_key(key, b)
                held = state.get(key_b)
                if in_place and held is not None and held.shape == stored.shape and held.dtype == stored.dtype:
                    held.copy_(stored)
                else:
                    state[key_b] = stored.contiguous()

    # -------------------------------------------------------------------------------------- codec
    def decode_parts(
        self, pieces: dict, b: int
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Batch b's stored momentum in parts: residual (c, rows, cols) fp32, P R^T (c, rows, cols) in
        ``product_dtype`` (None without a split), the stored norm (c, 1, 1) (None unless ``store_norm``) and
        R (c, cols, r); the momentum is ``combine(res, P R^T, norm)``. All None before step 1."""
        if not any(k in pieces for k in ("res", "res_codes")):
            return None, None, None, None
        cols, r, bits, mu = self.plan.batch_shape(b)[1], self.rank(b), self.bits, self.mu
        low_rank = None
        if bits == 32:
            res, R = pieces["res"], pieces.get("R")
            if R is not None:
                low_rank = product(pieces["P"], R.mT, self.product_dtype)
        else:
            scale = pieces["res_scale"]
            scale = scale.view(-1, 1, 1) if scale.ndim == 1 else scale
            res = dequantize(pieces["res_codes"], scale, cols, bits, mu, self.granularity, self.block_size)
            R = None
            if "R_codes" in pieces:
                P = dequantize(pieces["P_codes"], pieces["P_scale"].unsqueeze(-2), r, bits, mu, "column")
                R = dequantize(pieces["R_codes"], pieces["R_scale"].unsqueeze(-2), r, bits, mu, "column")
                low_rank = product(P, R.mT, self.product_dtype)
        norm = pieces["norm"].view(-1, 1, 1) if "norm" in pieces else None
        return res, low_rank, norm, R

    def decode(self, pieces: dict, b: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Batch b's momentum (c, rows, cols) and right factor R (c, cols, r); (None, None) before step 1."""
        res, low_rank, norm, R = self.decode_parts(pieces, b)
        return (None, None) if res is None else (combine(res, low_rank, norm), R)

    def encode(
        self,
        pieces: dict,
        M: torch.Tensor,
        P: torch.Tensor | None,
        R: torch.Tensor | None,
        norm: torch.Tensor | None,
        rounding_key: tuple[int, ...],
        row_max: RowSum = no_reduction,
    ) -> None:
        """Write a batch's momentum M (c, L, cols) as pieces: its split P (c, L, r) / R (c, cols, r), the
        residual M - P R^T and the norm (c, 1, 1); ``row_max`` reduces absmax over the ranks holding row shards
        of M and P."""
        bits, mu, group = self.bits, self.mu, self.group
        if group["store_norm"] and norm is not None:
            pieces["norm"] = norm.flatten().float()  # (c,)
        low_rank = None if P is None else product(P, R.mT, self.product_dtype)  # (c, L, cols)
        if bits == 32:
            pieces["res"] = residual(M, low_rank).contiguous()
            if P is not None:
                pieces["P"], pieces["R"] = P.contiguous(), R.contiguous()
            return

        def rounding(kind: int) -> dict:
            if not group["stochastic_rounding"]:
                return {}
            return {"stochastic": True, "generator": generator(group["seed"], *rounding_key, kind)}

        dtype = scale_dtype(group)
        if row_max is no_reduction and not group["stochastic_rounding"]:  # one process: residual + codes fused
            absmax = _residual_absmax_fused(M, low_rank, self.granularity, self.block_size)
            scale = group_scale(absmax, bits, mu, dtype)  # (c, 1, 1) or (c, L, nb)
            points = code_points(scale, bits, mu)  # (7, c, 1, 1) level boundaries or (1, c, 1, 1) scales
            per_code = _residual_code_bytes_fused(M, low_rank, points, bits, mu, self.granularity, self.block_size)
            codes = store_codes(per_code, bits)  # packed after the loop (see codecs.pack_nibbles)
        else:
            codes, scale = quantize(residual(M, low_rank), bits, mu, self.granularity, self.block_size,
                                    group_max=row_max, scale_dtype=dtype, **rounding(0))
        pieces["res_codes"] = codes
        pieces["res_scale"] = scale.flatten() if self.granularity == "matrix" else scale
        if P is not None:
            group_max = None if row_max is no_reduction else row_max  # None: no reduction, a fused encode
            P_codes, P_scale = quantize(P, bits, mu, "column", group_max=group_max, scale_dtype=dtype, **rounding(1))
            R_codes, R_scale = quantize(R, bits, mu, "column", scale_dtype=dtype, **rounding(2))  # (c, cols, w)
            pieces["P_codes"], pieces["P_scale"] = P_codes, P_scale.squeeze(-2)
            pieces["R_codes"], pieces["R_scale"] = R_codes, R_scale.squeeze(-2)

    def dequantized(self, state: dict) -> torch.Tensor | None:
        """The stored momentum of a whole (unsharded) parameter as (E, m, n) fp32; None before the first step."""
        if "step" not in state:
            return None
        out = None
        for b in range(len(self.plan.batches)):
            M, _ = self.decode(self.load(state, b), b)
            if out is None:
                out = M.new_zeros(M.size(0) // len(self.plan.batches[b]), self.plan.m, self.plan.n)
            self.plan.put(out, b, M)
        return out


def state_schema(shape: tuple[int, ...], group: dict, dtype: torch.dtype = F32) -> Schema:
    """Every state entry of a parameter of ``shape`` and ``dtype`` in ``group`` (all options set) after a step: the
    momentum's or AdamW's, and a low-precision weight's Kahan buffer (``weight_update="kahan"``)."""
    out = QuantizedMomentum.of(shape, group).schema() if group["use_muon"] else adamw_schema(shape, group)
    if group["weight_update"] == "kahan" and dtype in LOW_PRECISION:
        out[KAHAN] = (tuple(shape), dtype)
    return out


# ------------------------------------------------------------------------- DeepSpeed's flat states
def owned_state(flat_state: dict, index: int) -> dict:
    """The Muon state of matrix ``index`` inside a ZeRO flat partition's state (keys ``m{index}.*``)."""
    prefix = f"m{index}."
    return {k[len(prefix) :]: v for k, v in flat_state.items() if k.startswith(prefix)}


def store_owned_state(flat_state: dict, index: int, state: dict) -> None:
    prefix = f"m{index}."
    for k in [k for k in flat_state if k.startswith(prefix)]:
        del flat_state[k]
    flat_state.update({prefix + k: v for k, v in state.items()})


def owned_indices(flat_state: dict) -> set[int]:
    """Indices of the matrices whose Muon state a ZeRO flat partition's state holds."""
    return {int(k[1:].split(".", 1)[0]) for k in flat_state if k.startswith("m") and k[1:].split(".", 1)[0].isdigit()}
