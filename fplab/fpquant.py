"""Simulated floating-point quantization and quantized Adam / Muon (arXiv 2510.21314, docs/fp_quantization.md).

``round_to_format`` rounds a tensor to a float format with ``exp_bits`` exponent and ``man_bits`` mantissa
bits, IEEE-style: bias 2^(E-1)-1, subnormals (gradual underflow), round-to-nearest-even or stochastic
rounding, overflow to inf or saturation at the largest finite value. The result is returned in the input's
dtype (fp32 or fp64), so a format wider than the input is not simulated (E <= 8, M <= 23 for fp32 inputs).

``QuantizedAdam`` and ``QuantizedMuon`` store the weights W and the moments M, V in such formats and see the
gradient G through one: every component is a separate switch (None = exact fp32), which is what the
paper's per-component analysis needs. ``horizon_formats`` gives the paper's horizon-dependent precision
rule: the relative error q = 2^-M must be O(1/T) for Adam's G, M and O(1/T^2) for its W, V, and only
O(T^-1/2) for Muon, so the mantissa grows like log2 T, 2 log2 T and 0.5 log2 T.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from muonq_hf.orthogonalize import muon_scale, zeropower_via_newtonschulz5

ROUNDINGS = ("nearest", "stochastic")
OVERFLOWS = ("saturate", "inf")


def _check_bits(exp_bits: int, man_bits: int) -> None:
    # E >= 2 so that the bias is positive; E <= 8 and M <= 23 so that fp32 can hold every value exactly.
    if not isinstance(exp_bits, int) or not 2 <= exp_bits <= 8:
        raise ValueError(f"exp_bits must be an int in [2, 8], got {exp_bits!r}")
    if not isinstance(man_bits, int) or not 0 <= man_bits <= 23:
        raise ValueError(f"man_bits must be an int in [0, 23], got {man_bits!r}")


@dataclass(frozen=True)
class FloatFormat:
    """A binary floating-point format: 1 sign bit, ``exp_bits`` exponent bits, ``man_bits`` mantissa bits.

    ``finite_only`` is the OCP FP8 "fn" convention (torch.float8_e4m3fn): there is no inf, the all-ones
    exponent is an ordinary binade and only S.1111.111 is NaN, so e4m3fn reaches 448 instead of the
    IEEE-style 240. Such a format can only saturate on overflow.
    """

    exp_bits: int
    man_bits: int
    finite_only: bool = False

    def __post_init__(self) -> None:
        _check_bits(self.exp_bits, self.man_bits)

    @property
    def bias(self) -> int:
        return 2 ** (self.exp_bits - 1) - 1

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal number (subnormals share its spacing)."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        # IEEE reserves the all-ones exponent for inf/NaN; "fn" formats use it for finite numbers.
        return self.bias + 1 if self.finite_only else self.bias

    @property
    def max_value(self) -> float:
        # "fn" formats lose one mantissa code (all ones) to NaN in the top binade.
        top_mantissa = 2 - 2 * 2.0**-self.man_bits if self.finite_only else 2 - 2.0**-self.man_bits
        return top_mantissa * 2.0**self.emax

    @property
    def min_normal(self) -> float:
        return 2.0**self.emin

    @property
    def min_subnormal(self) -> float:
        return 2.0 ** (self.emin - self.man_bits)

    @property
    def default_overflow(self) -> str:
        """What the hardware format does: saturate without inf, inf otherwise."""
        return "saturate" if self.finite_only else "inf"

    @property
    def name(self) -> str:
        return f"e{self.exp_bits}m{self.man_bits}" + ("fn" if self.finite_only else "")


FORMATS: dict[str, FloatFormat] = {
    "fp32": FloatFormat(8, 23),
    "fp16": FloatFormat(5, 10),
    "bf16": FloatFormat(8, 7),
    # torch.float8_e4m3fn / OCP E4M3: no inf, max 448, saturates (torch's cast saturates too, see tests).
    "e4m3": FloatFormat(4, 3, finite_only=True),
    "e5m2": FloatFormat(5, 2),
}

FormatLike = FloatFormat | str | tuple[int, int] | None

# The bit layout of the input dtypes: integer view, exponent-field shift (mantissa width), exponent bias.
_LAYOUT = {torch.float32: (torch.int32, 23, 127), torch.float64: (torch.int64, 52, 1023)}


def as_format(spec: FormatLike) -> FloatFormat | None:
    """Parse a format: a FloatFormat, a preset name (``FORMATS``), ``"eXmY"``, an (E, M) tuple, or None."""
    if spec is None or isinstance(spec, FloatFormat):
        return spec
    if isinstance(spec, tuple) and len(spec) == 2:
        return FloatFormat(*spec)
    if isinstance(spec, str):
        if spec in FORMATS:
            return FORMATS[spec]
        match = re.fullmatch(r"e(\d+)m(\d+)(fn)?", spec)
        if match:
            return FloatFormat(int(match[1]), int(match[2]), finite_only=bool(match[3]))
    raise ValueError(
        f"unknown float format {spec!r}: use one of {sorted(FORMATS)}, 'eXmY' (e.g. 'e8m3'), "
        "an (exp_bits, man_bits) tuple, a FloatFormat or None"
    )


def round_to_format(
    x: torch.Tensor,
    exp_bits: int,
    man_bits: int,
    rounding: str = "nearest",
    overflow: str = "inf",
    generator: torch.Generator | None = None,
    finite_only: bool = False,
) -> torch.Tensor:
    """Round ``x`` to the nearest (or a stochastically chosen neighbouring) value of the format E``exp_bits``
    M``man_bits``; returns a new tensor of ``x``'s dtype.

    nearest: ties to even, like a hardware cast. stochastic: round up with probability equal to the
    distance to the lower neighbour in ulps, so E[round(x)] = x (within range). overflow: "inf" turns
    results beyond the largest finite value into +-inf (IEEE, what torch does for fp16, bf16, e5m2);
    "saturate" clamps them, and inf inputs, to +-max (what torch does for float8_e4m3fn). NaN stays NaN.
    """
    _check_bits(exp_bits, man_bits)
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if overflow not in OVERFLOWS:
        raise ValueError(f"overflow must be one of {OVERFLOWS}, got {overflow!r}")
    if finite_only and overflow == "inf":
        raise ValueError("a finite_only format has no inf: overflow must be 'saturate', got 'inf'")
    if x.dtype not in _LAYOUT:
        raise ValueError(f"round_to_format needs a float32 or float64 tensor, got {x.dtype}")
    return _round(x, FloatFormat(exp_bits, man_bits, finite_only), rounding, overflow, generator)


def _round(x: torch.Tensor, fmt: FloatFormat, rounding: str, overflow: str,
           generator: torch.Generator | None) -> torch.Tensor:
    """round_to_format without the argument checks (the optimizers check once, then call this per step)."""
    man_bits = fmt.man_bits
    # Every step is exact in x's own dtype (E <= 8, M <= 23): x / ulp only shifts the exponent, ulp >= 2^-149
    # is representable (as an fp32 subnormal at worst), and q * ulp has at most M + 1 significant bits.
    x = x.detach()
    # ulp = 2^(max(floor(log2|x|), emin) - M). The exponent is read from x's bits (fewer, cheaper ops than
    # frexp + ldexp: these tensors are small and op count is the cost); zeros and subnormals of x's dtype
    # have field 0, inf/NaN the all-ones field, clamped to the top binade (inf / ulp stays inf).
    int_dtype, field_shift, dtype_bias = _LAYOUT[x.dtype]
    field = (x.view(int_dtype) >> field_shift) & (2 * dtype_bias + 1)
    field = torch.clamp(field, min=fmt.emin + dtype_bias, max=2 * dtype_bias)
    ulp = (field << field_shift).view(x.dtype) * 2.0**-man_bits  # a normal 2^e, then an exact 2^-M
    scaled = x / ulp  # the significand in units of the last place, |scaled| < 2^(M+1)
    if rounding == "nearest":
        q = torch.round(scaled)  # round half to even
    else:
        # fp32 uniforms are multiples of 2^-24 and the fraction has at most 23 - M bits: P(up) = frac exactly.
        low = torch.floor(scaled)
        u = torch.rand(scaled.shape, generator=generator, dtype=scaled.dtype, device=scaled.device)
        q = low + (u < scaled - low).to(scaled.dtype)
    y = q * ulp  # a carry into the next binade (e.g. 1.11b -> 10.0b) is still exact
    if overflow == "saturate":
        return torch.clamp(y, -fmt.max_value, fmt.max_value)
    if x.dtype == torch.float32 and fmt.exp_bits == 8 and not fmt.finite_only:
        return y  # fp32 arithmetic already overflows to +-inf exactly where an e8 format does
    return torch.where(y.abs() <= fmt.max_value, y, y * math.inf)  # +-inf beyond max; NaN stays NaN


def quantize(
    x: torch.Tensor,
    fmt: FormatLike,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
    overflow: str | None = None,
) -> torch.Tensor:
    """``round_to_format`` with a format spec (None returns ``x`` itself); overflow defaults to its own."""
    fmt = as_format(fmt)
    if fmt is None:
        return x
    return round_to_format(
        x, fmt.exp_bits, fmt.man_bits, rounding, overflow or fmt.default_overflow, generator, fmt.finite_only
    )


# --- the paper's horizon-dependent precision rule -------------------------------------------------------

# log2 of the required relative error q = 2^-M as a multiple of log2 T (q = O(T^-k) <=> M = k log2 T + c).
HORIZON_EXPONENTS = {
    "adam": {"G": 1.0, "M": 1.0, "W": 2.0, "V": 2.0},
    "muon": {"G": 0.5, "M": 0.5, "W": 0.5},
}


def horizon_mantissa_bits(horizon: int, optimizer: str, component: str, offset: int = 0) -> int:
    """Mantissa bits the theory asks for at horizon T: ceil(k log2 T) + offset, clipped to [1, 23].

    k = 1 for Adam's G and M, 2 for its W and V, 0.5 for every Muon component. ``offset`` is the O(1)
    constant the theory leaves open.
    """
    if optimizer not in HORIZON_EXPONENTS:
        raise ValueError(f"optimizer must be one of {sorted(HORIZON_EXPONENTS)}, got {optimizer!r}")
    if component not in HORIZON_EXPONENTS[optimizer]:
        raise ValueError(
            f"component for {optimizer} must be one of {sorted(HORIZON_EXPONENTS[optimizer])}, "
            f"got {component!r}"
        )
    if not isinstance(horizon, int) or horizon < 1:
        raise ValueError(f"horizon must be a positive int (the number of steps T), got {horizon!r}")
    bits = math.ceil(HORIZON_EXPONENTS[optimizer][component] * math.log2(horizon)) + offset
    return min(max(bits, 1), 23)


def horizon_formats(
    horizon: int, optimizer: str, exp_bits: int = 8, offset: int = 0
) -> dict[str, FloatFormat]:
    """The formats of every component of ``optimizer`` ("adam" or "muon") for a run of ``horizon`` steps."""
    if optimizer not in HORIZON_EXPONENTS:
        raise ValueError(f"optimizer must be one of {sorted(HORIZON_EXPONENTS)}, got {optimizer!r}")
    return {
        c: FloatFormat(exp_bits, horizon_mantissa_bits(horizon, optimizer, c, offset))
        for c in HORIZON_EXPONENTS[optimizer]
    }


# --- quantized optimizers -------------------------------------------------------------------------------


class _QuantizedOptimizer(torch.optim.Optimizer):
    """Shared plumbing: per-component formats, rounding mode, a seeded generator for stochastic rounding."""

    _name = ""  # "adam" or "muon": the key of the horizon rule

    def __init__(self, params, defaults: dict, formats: dict[str, FormatLike], rounding: str,
                 horizon: int | None, horizon_offset: int, seed: int) -> None:
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
        super().__init__(params, defaults)
        rule = horizon_formats(horizon, self._name, offset=horizon_offset) if horizon is not None else {}
        # Explicit formats win over the horizon rule, component by component.
        self.formats = {c: as_format(formats[c]) if formats[c] is not None else rule.get(c) for c in formats}
        self.rounding = rounding
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}
        # W lives in its format from the start: the initial point is already a stored weight.
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    self._q_("W", p)

    def _q(self, component: str, x: torch.Tensor) -> torch.Tensor:
        fmt = self.formats[component]
        if fmt is None:
            return x
        gen = None
        if self.rounding == "stochastic":
            if x.device not in self._generators:
                self._generators[x.device] = torch.Generator(x.device).manual_seed(self.seed)
            gen = self._generators[x.device]
        if x.dtype not in _LAYOUT:
            raise ValueError(f"quantized optimizers need float32 or float64 tensors, got {x.dtype}")
        return _round(x, fmt, self.rounding, fmt.default_overflow, gen)

    def _q_(self, component: str, x: torch.Tensor) -> torch.Tensor:
        """Quantize in place (state tensors and weights are stored in their format)."""
        if self.formats[component] is not None:
            x.copy_(self._q(component, x))
        return x

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, self._q("G", p.grad), self.state[p], group)
        return loss

    def _update(self, p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
        """One step for parameter ``p`` given its already quantized gradient."""
        raise NotImplementedError


class QuantizedAdam(_QuantizedOptimizer):
    """Adam (Kingma & Ba, with bias correction, no weight decay) with G, W, M, V in simulated float formats.

    One step, with Q_X rounding to component X's format (identity when its format is None)::

        g = Q_G(grad);  m = Q_M(lerp(m, g, 1 - beta1));  v = Q_V(beta2 v + (1 - beta2) g^2)
        W = Q_W(W - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps))

    The arithmetic between roundings is fp32 and in torch.optim.Adam's order, so with every format None
    (or fp32) it is bit-identical to ``torch.optim.Adam(foreach=False)``. ``horizon=T`` fills the
    formats left None from the paper's rule (``horizon_formats``).
    """

    _name = "adam"

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, *, g: FormatLike = None, w: FormatLike = None, m: FormatLike = None,
                 v: FormatLike = None, rounding: str = "nearest", horizon: int | None = None,
                 horizon_offset: int = 0, seed: int = 0) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps)
        formats = {"G": g, "W": w, "M": m, "V": v}
        super().__init__(params, defaults, formats, rounding, horizon, horizon_offset, seed)

    def _update(self, p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
        beta1, beta2 = group["betas"]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        m, v, t = state["exp_avg"], state["exp_avg_sq"], state["step"]
        self._q_("M", m.lerp_(grad, 1 - beta1))
        self._q_("V", v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2))
        step_size = group["lr"] / (1 - beta1**t)
        denom = (v.sqrt() / (1 - beta2**t) ** 0.5).add_(group["eps"])
        self._q_("W", p.addcdiv_(m, denom, value=-step_size))


def as_matrices(x: torch.Tensor) -> torch.Tensor:
    """The view Muon orthogonalizes: a scalar or 1-D vector (n,) as one (1, n) row, a matrix as is, and a
    tensor with ndim >= 3 as a batch of matrices over its leading dims (independent problems, e.g. seeds)."""
    return x.view(1, -1) if x.ndim < 2 else x


class QuantizedMuon(_QuantizedOptimizer):
    """Muon (docs/design.md, "Plain Muon", no weight decay) with G, W, M in simulated float formats. Muon has no V.

    One step, per parameter viewed by ``as_matrices`` (a 1-D bias or the Rosenbrock point becomes a
    (1, n) row, whose polar factor is its direction v/||v||, up to NS5's ~[0.7, 1.2] singular values)::

        g = Q_G(grad);  M = Q_M(beta M + g);  U = NS5(g + beta M if nesterov else M)
        W = Q_W(W - lr * 0.2 sqrt(max(m, n)) * U)

    Newton-Schulz is ``muonq_hf.orthogonalize.zeropower_via_newtonschulz5`` in fp32 on every device, so
    the only roundings studied are the simulated ones. ``horizon=T`` fills the formats left None from the
    paper's rule (q = O(T^-1/2) for all three).
    """

    _name = "muon"

    def __init__(self, params: Iterable, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = False,
                 ns_steps: int = 5, *, g: FormatLike = None, w: FormatLike = None, m: FormatLike = None,
                 rounding: str = "nearest", horizon: int | None = None, horizon_offset: int = 0,
                 seed: int = 0) -> None:
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps)
        formats = {"G": g, "W": w, "M": m}
        super().__init__(params, defaults, formats, rounding, horizon, horizon_offset, seed)

    def _update(self, p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
        beta = group["momentum"]
        if not state:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        buf = self._q_("M", state["momentum_buffer"].mul_(beta).add_(grad))
        direction = grad.add(buf, alpha=beta) if group["nesterov"] else buf
        mat = as_matrices(direction)
        update = zeropower_via_newtonschulz5(mat, steps=group["ns_steps"], dtype=torch.float32)
        scale = muon_scale(mat.size(-2), mat.size(-1))
        self._q_("W", p.add_(update.view_as(p).to(p.dtype), alpha=-group["lr"] * scale))
