"""The launcher of the test suite's worlds: ``torchrun --nproc_per_node 2`` (or 4) on CPU (gloo), with a free port,
one thread per rank and ``tests/scripts`` importable; a failure shows the workers' output."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(SCRIPTS))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(**extra: str) -> dict[str, str]:
    """The environment of the workers: one thread each, the repository and tests/scripts on PYTHONPATH."""
    path = os.pathsep.join([ROOT, SCRIPTS, os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **extra}


def torchrun_two(*program: str, env: dict[str, str] | None = None, timeout: int = 600) -> None:
    """``torchrun --nproc_per_node 2 --master_port PORT *program``: a script and its arguments, or ``-m module``."""
    torchrun(2, *program, env=env, timeout=timeout)


def torchrun(ranks: int, *program: str, env: dict[str, str] | None = None, timeout: int = 600) -> None:
    """``torchrun --nproc_per_node RANKS --master_port PORT *program``."""
    launcher = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [launcher, "--nproc_per_node", str(ranks), "--master_port", str(free_port()), *program]
    proc = subprocess.run(cmd, env=env or worker_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]


def accelerate_launch(config_file: str, *program: str, env: dict[str, str] | None = None, timeout: int = 600) -> None:
    """``accelerate launch --config_file CONFIG --main_process_port PORT *program`` (the yaml sets 2 processes)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config_file, "--main_process_port",
           str(free_port()), *program]
    proc = subprocess.run(cmd, env=env or worker_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]


def exit_after_results() -> None:
    """End a 2-rank worker once its results are written, skipping the interpreter's teardown: a gloo / DeepSpeed
    comm thread still running at exit aborted a rank now and then ("terminate called without an active
    exception", SIGABRT), or hung one in a futex wait after the other had left, both after the results were
    written. Every rank meets at a barrier first, so none leaves while another still needs it."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_two_ranks(script: str, *args: str, env: dict[str, str] | None = None) -> None:
    """A worker of tests/scripts on 2 ranks."""
    torchrun_two(os.path.join(SCRIPTS, script), *args, env=env)


def run_ranks(ranks: int, script: str, *args: str, env: dict[str, str] | None = None) -> None:
    """A worker of tests/scripts on ``ranks`` ranks (4: the 2 x 2 meshes of tests/test_hsdp.py)."""
    torchrun(ranks, os.path.join(SCRIPTS, script), *args, env=env)
