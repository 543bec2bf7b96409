"""Test-only: let Accelerate (and so the HF Trainer) run FSDP on CPU ranks with gloo.

Accelerate enables FSDP only on accelerators: on a CPU machine ``PartialState`` picks no backend for a
torchrun world unless ``cpu=True``, and ``cpu=True`` (``--use_cpu``) silently turns FSDP into DDP. ``install()``
makes ``_prepare_backend`` answer ("gloo", MULTI_GPU) in a torchrun world, so that an Accelerator built with
an FSDP plugin switches to ``DistributedType.FSDP``; ``ACCELERATE_TORCH_DEVICE=cpu`` keeps every tensor on the
CPU. Tests that use it must assert ``trainer.is_fsdp_enabled`` (or the distributed type), so that a silent
fallback cannot pass. Never import this outside tests.
"""

from __future__ import annotations

import os


def install() -> None:
    """Patch accelerate's PartialState before any Accelerator/TrainingArguments is built (call in each rank)."""
    os.environ.setdefault("ACCELERATE_TORCH_DEVICE", "cpu")
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    original = PartialState._prepare_backend

    def _prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        if int(os.environ.get("LOCAL_RANK", -1)) != -1 and not cpu:
            return "gloo", DistributedType.MULTI_GPU  # upgraded to FSDP by the Accelerator's fsdp_plugin
        return original(self, cpu, sagemaker_dp, backend)

    PartialState._prepare_backend = _prepare_backend
