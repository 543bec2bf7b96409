"""Test-only: let Accelerate (and so the HF Trainer) run DeepSpeed on CPU ranks with gloo.

Accelerate enables DeepSpeed only on accelerators: on a CPU machine ``PartialState`` picks no backend unless
``cpu=True``, and ``cpu=True`` turns DeepSpeed off. ``install()`` makes ``_prepare_backend`` answer
("gloo", MULTI_GPU) when ``ACCELERATE_USE_DEEPSPEED`` is set (the Trainer's ``--deepspeed`` sets it), so that
``PartialState`` initialises DeepSpeed's comm with gloo and switches to ``DistributedType.DEEPSPEED``;
``ACCELERATE_TORCH_DEVICE=cpu`` keeps every tensor on the CPU. ``TrainingArguments``' bf16-needs-a-GPU check
is bypassed. Never import this outside tests.
"""

from __future__ import annotations

import os


def install() -> None:
    """Patch accelerate's PartialState before any Accelerator/TrainingArguments is built (each rank)."""
    os.environ.setdefault("ACCELERATE_TORCH_DEVICE", "cpu")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    original = PartialState._prepare_backend

    def _prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and not cpu:
            return "gloo", DistributedType.MULTI_GPU  # replaced by DEEPSPEED at the end of PartialState.__init__
        return original(self, cpu, sagemaker_dp, backend)

    PartialState._prepare_backend = _prepare_backend

    # TrainingArguments refuses --bf16 without a bf16 GPU unless --use_cpu, and --use_cpu turns DeepSpeed off.
    # bf16 runs on CPU tensors; only the check is bypassed.
    import transformers.training_args as training_args

    training_args.is_torch_bf16_gpu_available = lambda: True
