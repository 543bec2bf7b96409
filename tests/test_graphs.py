"""The recorded step (``MuonQ(cuda_graph=True)``, muonq_hf.graphs) on the CPU, through an emulated CUDA graph.

A CUDA graph replays the kernels of the step it recorded: on the tensors it recorded, with the numbers it recorded.
``EmulatedGraph`` does the same with the dispatcher: it records every op of the step with its arguments, undoes
the step's effect on the tensors that outlive it (a real recording runs no kernel), and a replay runs the recorded
ops again, temporaries re-made, everything else as recorded. Ops on the state's host step counters are the
host's part (a real recording runs them once and does not replay them). A number baked into the recorded step (an
lr passed as a float) or a state entry replaced instead of updated in place would make a replay differ from the
eager step, which the tests below would see.
"""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

import muonq_hf.graphs as graphs
from muonq_hf import MuonQ, param_groups
from muonq_hf.graphs import GraphRefused, StepGraph


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out


class EmulatedGraph:
    """``capture(fn)`` for ``StepGraph``: records ``fn``'s ops, undoes their effect on ``persistent`` tensors except
    the host ``counters``, and returns a replay that runs the recorded ops again."""

    def __init__(self, opt: MuonQ) -> None:
        self.opt = opt
        self.replays = 0

    def __call__(self, fn):  # noqa: ANN001, ANN204
        counters = {id(c) for c in self.opt._graph.counters}
        counter_storages = {c.untyped_storage().data_ptr() for c in self.opt._graph.counters}
        persistent = [p for g in self.opt.param_groups for p in g["params"]]
        persistent += [p.grad for p in persistent]
        persistent += [v for s in self.opt.state.values() for k, v in s.items() if torch.is_tensor(v) and k != "step"]
        persistent += [v for bank in self.opt._backend().banks._banks.values() for k, v in bank.entries.items()
                       if k != "step"]
        saved = [(t, t.detach().clone()) for t in persistent]
        recorder = _Recorder()
        with recorder:
            fn()
        for t, before in saved:  # a recording runs no kernel
            t.detach().copy_(before)

        def host(op: tuple) -> bool:  # the host's part: reads of values and the step counters
            func, args, kwargs, _ = op
            if func is torch.ops.aten._local_scalar_dense.default:
                return True
            tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if torch.is_tensor(a)]
            return any(id(a) in counters or a.untyped_storage().data_ptr() in counter_storages for a in tensors)

        ops = [op for op in recorder.ops if not host(op)]

        def replay() -> None:
            made: dict[int, torch.Tensor] = {}
            swap = lambda a: made.get(id(a), a) if torch.is_tensor(a) else a  # noqa: E731
            for func, args, kwargs, out in ops:
                new = func(*tree_map(swap, args), **tree_map(swap, kwargs))
                for old, fresh in zip(torch.utils._pytree.tree_leaves(out), torch.utils._pytree.tree_leaves(new),
                                      strict=True):
                    if torch.is_tensor(old):
                        made[id(old)] = fresh
            self.replays += 1

        self._keep = recorder.ops  # the recorded outputs stay alive: their ids stay theirs
        return replay


def _model() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=32, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def _train(cuda_graph: bool, steps: int, **options) -> tuple[nn.Module, MuonQ]:
    """``steps`` steps with new gradient tensors each step and an lr that changes every step."""
    model = _model()
    opt = MuonQ(param_groups(model), lr=0.01, cuda_graph=cuda_graph, **options)
    if cuda_graph:
        opt._graph = StepGraph(EmulatedGraph(opt), device_type="cpu")
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = 0.01 * (1 - step / 10)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen) * 0.1
        opt.step()
    return model, opt


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("options", [
    dict(bits=32, ns_dtype="fp32", weight_decay=0.1),  # fp32 state: the same arithmetic up to rounding
    dict(adamw_bits=8, weight_decay=0.1),  # the defaults with 8-bit AdamW
])
def test_replays_equal_the_eager_steps(options):
    """6 steps, a new lr at each and new gradient tensors: step 1 makes the state, step 2 runs the graph's form,
    step 3 is recorded and replayed, steps 4-6 are replays. Every weight ends where the eager steps put it: to 1e-6
    with fp32 state (the recorded form scales by a device lr: rounding), to 1e-3 with 4-bit codes (a rounding
    difference can flip a code)."""
    eager, _ = _train(False, 6, **options)
    graphed, opt = _train(True, 6, **options)
    assert opt._graph.recordings == 1 and opt._graph.capture.replays == 4
    tolerance = 1e-6 if options.get("bits") == 32 else 1e-3
    for (name, p), q in zip(graphed.named_parameters(), eager.parameters(), strict=True):
        assert _relative(p.detach(), q.detach()) < tolerance, f"{name}: {_relative(p.detach(), q.detach()):.2e}"
    # the host counts kept up with the replays, so a checkpoint says 6 steps
    assert all(float(s["step"]) == 6 for s in opt.state.values())


def test_a_baked_lr_would_be_seen(monkeypatch):
    """The emulation has teeth: a recorded step that took lr as a number (not a device scalar) keeps the lr of its
    recording, and its weights leave the eager ones."""
    real = graphs.graph_group
    monkeypatch.setattr(graphs, "graph_group", lambda group, device: {**real(group, device), "lr": float(group["lr"])})
    monkeypatch.setattr(StepGraph, "_fill", lambda self, states: [
        graph[graphs.DEVICE_STEP].fill_(float(states[first]["step"]) + 1)
        for _, graph, first in self.groups.values() if graphs.DEVICE_STEP in graph])
    graphed, _ = _train(True, 6, bits=32, ns_dtype="fp32")
    monkeypatch.undo()
    eager, _ = _train(False, 6, bits=32, ns_dtype="fp32")
    pairs = zip(graphed.parameters(), eager.parameters(), strict=True)
    worst = max(_relative(p.detach(), q.detach()) for p, q in pairs)
    assert worst > 1e-4, worst


def test_a_changed_option_or_loaded_state_records_again():
    model, opt = _train(True, 4)
    assert opt._graph.recordings == 1
    gen = torch.Generator().manual_seed(5)

    def step() -> None:
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen) * 0.1
        opt.step()

    opt.param_groups[0]["momentum"] = 0.9  # an option other than lr: the form runs once, then a new recording
    step()
    step()
    assert opt._graph.recordings == 2
    opt.load_state_dict(opt.state_dict())
    step()
    step()
    assert opt._graph.recordings == 3


def test_refusals_name_the_cause_and_change_nothing():
    """CPU parameters, a missing gradient, stochastic rounding, a backend that cannot be recorded, a bad value:
    each refused with its cause before any weight changes. (Sharded backends say ``capturable = False`` as the
    replaced stage does; tests/test_fsdp2.py and tests/test_deepspeed.py run them.)"""
    model = _model()
    opt = MuonQ(param_groups(model), lr=0.01, cuda_graph=True)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(GraphRefused, match="cuda_graph=True needs CUDA parameters; parameter 0"):
        opt.step()
    opt._graph = StepGraph(EmulatedGraph(opt), device_type="cpu")
    next(model.parameters()).grad = None
    with pytest.raises(GraphRefused, match="needs a gradient for every parameter"):
        opt.step()
    opt = MuonQ(param_groups(model, stochastic_rounding=True), lr=0.01, cuda_graph=True)
    opt._graph = StepGraph(EmulatedGraph(opt), device_type="cpu")
    next(model.parameters()).grad = torch.ones_like(next(model.parameters()))
    with pytest.raises(GraphRefused, match="cannot record stochastic_rounding"):
        opt.step()

    class ReplacedStage(MuonQ):  # a replaced momentum stage runs parameter by parameter: not recordable
        def momentum_stage(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
            return super().momentum_stage(*args, **kwargs)

    with pytest.raises(GraphRefused, match="momentum stage is replaced"):
        ReplacedStage(param_groups(model), lr=0.01, cuda_graph=True).step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    with pytest.raises(ValueError, match="cuda_graph='yes' is not allowed"):
        MuonQ(param_groups(model), cuda_graph="yes")


def test_a_failed_recording_is_refused_and_leaves_the_counts():
    """A kernel that cannot be recorded (CUDA says "operation not permitted when stream is capturing") fails the
    recording after its host part ran: the step counts go back, no weight moved, and the error says what to do."""
    model, opt = _train(True, 2)  # state made, graph form warmed up: the next step records

    def failing(fn):  # noqa: ANN001, ANN202
        for counter in opt._graph.counters:
            counter += 1  # the host part of the step ran before the failing kernel
        raise RuntimeError("operation not permitted when stream is capturing")

    opt._graph.capture = failing
    counts = {id(p): float(s["step"]) for p, s in opt.state.items()}
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(GraphRefused, match="recording the step as a CUDA graph failed.*cuda_graph=False"):
        opt.step()
    assert {id(p): float(s["step"]) for p, s in opt.state.items()} == counts
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
