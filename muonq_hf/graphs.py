"""Whole-step CUDA graphs (``MuonQ(cuda_graph=True)``): the device work of a step recorded once, replayed after.

A GPU step of many small matrices is bound by the host: each of its hundreds of kernels costs a launch
(docs/design.md, "Host syncs and launches"). A CUDA graph records the kernels of one step and replays them in one
call. Replay re-runs the recorded kernels on the recorded tensors with the recorded arguments, so the step
must keep three promises, which the step of one process (and of each replicated DDP rank) keeps:

* no host reads of device values and nothing copied from the host (tests/test_device_step.py);
* every tensor it reads or writes is the same from step to step: states are updated in place (a shape
  group's bank), gradients are read from buffers kept by the graph (a gradient that is a new tensor, as after
  ``zero_grad(set_to_none=True)``, is copied into its buffer first: one gradient copy of memory);
* every number that changes from step to step reaches the kernels as a device tensor, filled in place before
  each replay: each group's lr and its AdamW step count (``adamw.DEVICE_STEP``), from which the decay factor and
  the bias corrections are computed inside the graph. Other options are recorded as they are: changing one
  (or the parameters, their gradients' presence, a loaded state) records the step again, once.

The host keeps its part outside the graph: the non-finite decision before it (one read, as without a graph)
and the step counts of the state (host tensors, which the replay does not touch) after it.

Recording needs a step in the graph's form first (it compiles the fused kernels for device scalars and
allocates the step's buffers): with a graph, the first step runs as usual (it makes the state), the second
runs the graph's form eagerly, the third is recorded and replayed, and every later one is replayed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, MutableMapping
from typing import Any

import torch

from .adamw import DEVICE_STEP
from .weights import LOW_PRECISION

logger = logging.getLogger("transformers.muonq_hf")

States = MutableMapping[torch.Tensor, dict]


class GraphRefused(ValueError):
    """What makes a step impossible to record as a CUDA graph, said before anything changes."""


class StepGraph:
    """The recorded step of one optimizer: its graph groups (device lr and step count per param group), the
    gradient buffers it reads and the host step counters it advances after each replay."""

    def __init__(
        self, capture: Callable[[Callable[[], None]], Callable[[], None]] | None = None, device_type: str = "cuda"
    ) -> None:
        self.capture = capture or cuda_capture  # records a function, returns its replay (tests pass an emulation)
        self.device_type = device_type  # of the parameters it records (tests emulate a recording on the CPU)
        self.key: tuple | None = None  # what the recorded step depends on (``recording_key``)
        self.replay: Callable[[], None] | None = None
        self.warm = False  # the graph's form ran once since ``key`` last changed
        # id of a param group -> (the group, its graph form with device lr and step count, its first parameter)
        self.groups: dict[int, tuple[dict, dict, torch.Tensor]] = {}
        self.grads: list[torch.Tensor] = []  # the gradient tensors the recorded step reads
        self.counters: list[torch.Tensor] = []  # host step counts of the state, advanced after each replay
        self.recordings = 0

    def reset(self) -> None:
        """Forget the recording (a loaded state, new groups): the next step records again."""
        self.key, self.replay, self.warm = None, None, False

    def step(self, run: Callable[[list], None], tasks: list, states: States) -> None:
        """One step: ``run`` (the backend's step over ``tasks``) as usual while a parameter has no state yet, else
        in the graph's form: run eagerly once, then recorded, then replayed."""
        check_recordable(tasks, self.device_type)
        if any("step" not in states.get(t.param, {}) for t in tasks):  # the first step makes the state
            self.reset()
            run(tasks)
            return
        key = recording_key(tasks, states)
        if key != self.key:
            if self.key is not None:
                logger.info("MuonQ: the step changed (parameters, options or state); recording its CUDA graph again")
            check_counts(tasks, states)
            self.reset()
            self.key = key
            self.groups = {}
            for t in tasks:  # per param group: its graph form and, for AdamW, a tensor that holds its step count
                if id(t.group) not in self.groups:
                    self.groups[id(t.group)] = (t.group, graph_group(t.group, t.param.device), t.param)
        self._fill(states)
        graph = [type(t)(t.index, self.groups[id(t.group)][1], t.param) for t in tasks]
        if not self.warm:  # compile and allocate in the graph's form: a real step
            run_warm(lambda: run(graph), tasks[0].param.device)
            self.warm = True
            return
        if self.replay is None:
            self.grads = [t.param.grad for t in tasks]
            self.counters = [states[t.param]["step"] for t in tasks]
            counts = [c.clone() for c in self.counters]
            try:
                self.replay = self.capture(lambda: run(graph))  # it advanced the host counts, not the device
            except RuntimeError as exc:  # a kernel that cannot be recorded: nothing ran, the counts go back
                torch._foreach_copy_(self.counters, counts)
                self.reset()
                raise GraphRefused(
                    f"MuonQ: recording the step as a CUDA graph failed ({type(exc).__name__}: {exc}); no state or "
                    "weight was changed. Pass cuda_graph=False"
                ) from exc
            self.recordings += 1
        else:
            torch._foreach_add_(self.counters, 1.0)  # what ``run`` counts on the host, the replay does not
            self._feed(tasks)
        self.replay()

    def _fill(self, states: States) -> None:
        """Each graph group's lr and AdamW step count of this step, filled in place (no host-to-device copy)."""
        for group, graph, first in self.groups.values():
            graph["lr"].fill_(float(group["lr"]))
            if DEVICE_STEP in graph:  # every AdamW tensor of a group is at one count (check_recordable)
                graph[DEVICE_STEP].fill_(float(states[first]["step"]) + 1)

    def _feed(self, tasks: list) -> None:
        """Copy the gradients that are new tensors into the buffers the recorded step reads."""
        pairs = zip(self.grads, tasks, strict=True)
        stale = [(buffer, t.param.grad) for buffer, t in pairs if t.param.grad is not buffer]
        if stale:
            torch._foreach_copy_([b for b, _ in stale], [g for _, g in stale])


def graph_group(group: dict, device: torch.device) -> dict:
    """The graph form of a param group: its lr (and, for AdamW, its step count) as device scalars."""
    out = {**group, "lr": torch.zeros((), device=device)}
    if not group["use_muon"]:
        out[DEVICE_STEP] = torch.zeros((), device=device)
    return out


def recording_key(tasks: list, states: States) -> tuple:
    """What a recording depends on: the parameters (and their storage), their state dicts, every option but lr."""
    options = {id(t.group): t.group for t in tasks}
    return (
        tuple((id(t.param), t.param.data_ptr(), id(states[t.param])) for t in tasks),
        tuple((g, tuple((k, repr(v)) for k, v in sorted(group.items()) if k not in ("params", "lr")))
              for g, group in options.items()),
    )


def check_recordable(tasks: list, device_type: str = "cuda") -> None:
    """Refuse, before anything changes, a step that a CUDA graph cannot record."""
    for t in tasks:
        p = t.param
        where = f"parameter {t.index} (shape {tuple(p.shape)})"
        if p.device.type != device_type:
            raise GraphRefused(f"MuonQ: cuda_graph=True needs CUDA parameters; {where} is on {p.device}")
        if p.grad is None:
            raise GraphRefused(
                f"MuonQ: cuda_graph=True needs a gradient for every parameter at every step; {where} has none. "
                "Freeze it with requires_grad=False before building the optimizer, or pass cuda_graph=False"
            )
        if t.group["weight_update"] == "stochastic" and p.dtype in LOW_PRECISION:
            raise GraphRefused(
                f"MuonQ: cuda_graph=True cannot record weight_update='stochastic' ({where}): its noise is keyed by the "
                "step count, held on the host. Pass weight_update='kahan' or cuda_graph=False"
            )
        if t.group["use_muon"] and t.group["stochastic_rounding"]:
            raise GraphRefused(
                f"MuonQ: cuda_graph=True cannot record stochastic_rounding ({where}): its noise is drawn on the "
                "host for each step. Pass stochastic_rounding=False or cuda_graph=False"
            )


def check_counts(tasks: list, states: States) -> None:
    """Refuse AdamW tensors of one group at different step counts: the graph holds one count per group."""
    counts: dict[int, set[float]] = {}
    for t in tasks:
        if not t.group["use_muon"]:
            counts.setdefault(id(t.group), set()).add(float(states[t.param]["step"]))
    uneven = [sorted(c) for c in counts.values() if len(c) > 1]
    if uneven:
        raise GraphRefused(
            f"MuonQ: cuda_graph=True needs the AdamW tensors of a group at one step count, got counts {uneven[0]} "
            "(a parameter added to a group later); put it in a group of its own, or pass cuda_graph=False"
        )


def cuda_capture(fn: Callable[[], None]) -> Callable[[], None]:
    """Record ``fn``'s kernels in a CUDA graph (``torch.cuda.graph``: its own memory pool, on the stream the
    warm-up ran on) and return the graph's replay. ``fn``'s host work runs once, now; its device work at each
    replay."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=_side_stream(torch.device("cuda", torch.cuda.current_device()))):
        fn()
    return graph.replay


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One stream per device for warming up and recording (torch's CUDA-graph recipe: lazy state of cuBLAS and the
    allocator is made on the stream that records, before it records)."""
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device)
    return _STREAMS[device]


_STREAMS: dict[torch.device, Any] = {}


def run_warm(fn: Callable[[], Any], device: torch.device) -> Any:
    """Run ``fn`` on the recording stream, waited for in both directions; elsewhere than CUDA just run it."""
    if device.type != "cuda":
        return fn()
    side = _side_stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        out = fn()
    torch.cuda.current_stream(device).wait_stream(side)
    return out
