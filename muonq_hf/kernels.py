"""Fused kernels: ``torch.compile`` of the step's pure elementwise functions, with an eager fallback.

The 4-bit encode (mu-law, scale, round, pack) and the normalize-and-update of the momentum are a dozen passes
over a matrix each in eager mode; compiled (inductor: C++ on CPU, Triton on CUDA) each becomes one or two
fused loops, 3x faster on a 768 x 3072 matrix on CPU (benchmarks/RESULTS.md). The compiled functions give the
eager codes (the same fp32 operations; reductions may sum in another order, which moves a value by an ulp).

``MUONQ_HF_COMPILE=0`` (or ``set_compile(False)``) runs everything eagerly; the tests do, to keep their
hundreds of tiny shapes from compiling. A function whose compilation fails (no C++ compiler, an unsupported
platform) falls back to eager for the rest of the process, with one warning.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import Any

import torch

logger = logging.getLogger("transformers.muonq_hf")
_SWITCH = "MUONQ_HF_COMPILE"


def _from_environment() -> bool:
    value = os.environ.get(_SWITCH, "1").strip()
    if value not in ("0", "1"):
        raise ValueError(f"{_SWITCH}={value!r} is not allowed; {_SWITCH} must be 1 (compile, the default) or 0 (eager)")
    return value == "1"


_enabled = _from_environment()

# Compiled variants one fused function may keep. torch's default (8) is reached inside one model: dynamic shapes
# still specialize square matrices, a batch of 1 and None arguments (the first step), and options change dtypes;
# past it torch runs the function eagerly from then on (a benchmark process with 5 MuonQ rows hit it). Applied
# only while a fused function runs; the process's own limit is restored after each call.
RECOMPILE_LIMIT = 64


def set_compile(enabled: bool) -> None:
    """Compile the fused kernels (True, the default) or run them eagerly (False), for this process."""
    global _enabled
    if not isinstance(enabled, bool):
        raise ValueError(f"set_compile({enabled!r}): expected True or False")
    _enabled = enabled


def compile_enabled() -> bool:
    return _enabled


def _compile_errors() -> tuple[type[BaseException], ...]:
    """The exceptions by which torch.compile says it could not compile: dynamo's own (a graph it cannot trace, a
    backend that failed) and inductor's. An error of the function itself is raised again by the eager rerun."""
    import torch._dynamo.exc as dynamo_exc

    errors: list[type[BaseException]] = [dynamo_exc.TorchDynamoException]
    try:
        import torch._inductor.exc as inductor_exc

        errors += [e for e in (getattr(inductor_exc, n, None) for n in ("InductorError", "CppCompileError")) if e]
    except ImportError:  # a torch without inductor
        pass
    return tuple(errors)


@functools.cache
def _recompile_limit_setting() -> tuple[Any, str]:
    """(torch._dynamo's config, the name of its recompile limit), looked up once, on first use: importing dynamo
    costs ~1 s, which `import muonq_hf` does not pay."""
    import torch._dynamo

    config = torch._dynamo.config
    return config, "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.6


# Calls of fused functions so far, and how many are running: a launch counter (benchmarks/launches.py) counts a
# fused call as one kernel and skips the ops inside it, also when they run eagerly.
_calls = {"total": 0, "depth": 0}


def fused_calls() -> int:
    """Fused-function calls made in this process so far."""
    return _calls["total"]


def inside_fused() -> bool:
    """Whether a fused function is running (its eager ops are one compiled kernel where compiling is on)."""
    return _calls["depth"] > 0


def fused(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` compiled on first use when compiling is enabled; eager when disabled or when compiling failed."""
    slot: dict[str, Any] = {"compiled": None, "failed": False}

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        _calls["total"] += 1
        _calls["depth"] += 1
        try:
            return _run(*args, **kwargs)
        finally:
            _calls["depth"] -= 1

    def _run(*args: Any, **kwargs: Any) -> Any:
        if not _enabled or slot["failed"]:
            return fn(*args, **kwargs)
        if slot["compiled"] is None:
            slot["compiled"] = torch.compile(fn, dynamic=True)
        config, name = _recompile_limit_setting()
        limit = getattr(config, name)
        setattr(config, name, max(limit, RECOMPILE_LIMIT))
        try:
            with torch.no_grad():  # pure math on tensors: one grad mode, so a caller's mode adds no recompile
                return slot["compiled"](*args, **kwargs)
        except _compile_errors() as exc:  # no compiler here: eager gives the same values
            slot["failed"] = True
            logger.warning("MuonQ: compiling %s failed (%s); running it eagerly from now on", fn.__name__,
                           type(exc).__name__)
            return fn(*args, **kwargs)
        finally:
            setattr(config, name, limit)

    run.eager = fn  # type: ignore[attr-defined]
    return run
