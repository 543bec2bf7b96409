"""The step on an accelerator, checked on a CPU-only machine: MuonQ's step on tensors without data.

The step runs on the "meta" device, which has the accelerator's code path (every branch of the package is
"CPU" or "not CPU") and tensors without values (FakeTensorMode's CUDA tensors would do too, but Python indexing
of them needs a CUDA build). A dispatch mode (``HostTraffic``) records every read of device data by the host
(``.item()``, ``bool()``: a sync on a GPU) and every copy between host and device, with the line of the package
that made it, and answers reads with a plausible value. After the first step a step reads one device value,
the non-finite decision (agreed by all ranks), and copies nothing.
"""

from __future__ import annotations

import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import GPT2Config, GPT2LMHeadModel

from muonq_hf import MuonQ, codecs, kernels, keyed, param_groups

aten = torch.ops.aten


def _caller() -> str:
    """The innermost line of the package on the stack (where a read or a copy comes from)."""
    frames = [f for f in traceback.extract_stack() if "/muonq_hf/" in f.filename]
    return f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno} {frames[-1].line}" if frames else "?"


class HostTraffic(TorchDispatchMode):
    """Records host reads of device values and host<->device copies; answers reads with a plausible value
    (True, 1, 1.0: there is no data under FakeTensorMode)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []
        self.copies: list[str] = []

    def __enter__(self) -> HostTraffic:
        # torch.tensor(data, device=...) copies host data to the device below the dispatcher: watched at the call
        self._constructors = {name: getattr(torch, name) for name in ("tensor", "as_tensor")}
        for name, make in self._constructors.items():
            setattr(torch, name, self._watched(name, make))
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        for name, make in self._constructors.items():
            setattr(torch, name, make)
        super().__exit__(*exc)

    def _watched(self, name, make):  # noqa: ANN001, ANN202
        def constructor(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            device = kwargs.get("device")
            if device is not None and torch.device(device).type != "cpu":
                self.copies.append(f"cpu->{torch.device(device).type} at {_caller()} (torch.{name} of host data)")
            return make(*args, **kwargs)

        return constructor

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default:
            t = args[0]
            if t.device.type != "cpu":
                self.reads.append(_caller())
            return True if t.dtype == torch.bool else (1.0 if t.is_floating_point() else 1)
        if func is aten.copy_.default and args[0].device.type != args[1].device.type:
            self.copies.append(f"{args[1].device.type}->{args[0].device.type} at {_caller()}")
        if func is aten._to_copy.default and "device" in kwargs and kwargs["device"].type != args[0].device.type:
            self.copies.append(f"{args[0].device.type}->{kwargs['device'].type} at {_caller()}")
        return func(*args, **kwargs)


CACHES = (keyed.device_keys, codecs._levels_of_byte, codecs.dynamic_codebook)  # per-device tensors, made once


@pytest.fixture
def eager():
    """Eager kernels (their code is what a GPU compiles; inductor has no meta backend) and the per-device caches
    emptied before, so that the first step makes its device tensors in front of the check."""
    before = kernels.compile_enabled()
    kernels.set_compile(False)
    for cache in CACHES:
        cache.cache_clear()
    yield
    kernels.set_compile(before)


def gpt2() -> GPT2LMHeadModel:
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    with torch.device("meta"):
        return GPT2LMHeadModel(config)


@pytest.mark.parametrize("options", [{}, {"adamw_bits": 8}, {"nesterov": True, "store_norm": True}, {"bits": 32},
                                     {"batch_elements": 0}])
def test_a_step_after_the_first_reads_one_device_value_and_copies_nothing(eager, options):
    """GPT-2 (fused q/k/v pieces, square and rectangular shape groups, AdamW tensors): the second and third steps
    read one device value each, the non-finite decision, and copy nothing between host and device."""
    constructor = {k: options.pop(k) for k in list(options) if k == "batch_elements"}
    model = gpt2()
    opt = MuonQ(param_groups(model), lr=0.02, **constructor, **options)
    traffic = []
    for _ in range(3):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        with HostTraffic() as t:
            opt.step()
        traffic.append(t)
    assert traffic[0].copies, "the first step makes its device tensors (keys, tables) from the host"
    for i, t in enumerate(traffic[1:], 1):
        assert len(t.reads) == 1 and "ok.item()" in t.reads[0], f"step {i}: host reads of device values {t.reads}"
        assert t.copies == [], f"step {i}: host<->device copies {t.copies}"


def test_the_harness_sees_a_sync_and_a_copy():
    """The check can fail: a host read of a device value and a host-to-device copy are both recorded."""
    x = torch.ones(3, device="meta")
    with HostTraffic() as t:
        bool(x.sum() > 0)
        torch.ones(3).to("meta")
        torch.tensor([1.0, 2.0], device="meta")
        torch.ones(()).item()  # host data: not a sync
    assert len(t.reads) == 1 and len(t.copies) == 2, (t.reads, t.copies)


class RecordedStep(HostTraffic):
    """HostTraffic, plus the ops on host tensors other than the step counters: a CUDA graph would run them once,
    while recording, and never again, so a recorded step must have none."""

    def __init__(self, counters: list[torch.Tensor]) -> None:
        super().__init__()
        self.counters = {c.untyped_storage().data_ptr() for c in counters}
        self.host_ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs or {})) if torch.is_tensor(a)]
        on_host = [a for a in tensors if a.device.type == "cpu"]
        if (on_host and func is not aten._local_scalar_dense.default
                and not any(a.untyped_storage().data_ptr() in self.counters for a in on_host)):
            self.host_ops.append(f"{func.__name__} at {_caller()}")
        return super().__torch_dispatch__(func, types, args, kwargs)


@pytest.mark.parametrize("options", [{}, {"adamw_bits": 8, "weight_decay": 0.1}])
def test_the_recorded_step_reads_nothing_copies_nothing_and_runs_nothing_on_the_host(eager, options):
    """``cuda_graph=True`` on the meta device: the function a CUDA graph records (the third step) reads no device
    value, copies nothing between host and device and runs no op on a host tensor but the step counters."""
    from muonq_hf.graphs import StepGraph

    model = gpt2()
    opt = MuonQ(param_groups(model), lr=0.02, cuda_graph=True, **options)
    seen: list[RecordedStep] = []

    def capture(fn):  # noqa: ANN001, ANN202
        with RecordedStep(opt._graph.counters) as watch:
            fn()
        seen.append(watch)
        return lambda: None

    opt._graph = StepGraph(capture, device_type="meta")
    for _ in range(3):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        with HostTraffic():  # answers the non-finite decision (meta tensors hold no values)
            opt.step()
    assert opt._graph.recordings == 1 and len(seen) == 1
    watch = seen[0]
    assert watch.reads == [], f"host reads of device values while recording: {watch.reads}"
    assert watch.copies == [], f"host<->device copies while recording: {watch.copies}"
    assert watch.host_ops == [], f"ops on host tensors while recording: {watch.host_ops[:5]}"
