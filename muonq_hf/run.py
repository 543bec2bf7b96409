"""Run an unmodified HF training script with ``--optim muonq`` available.

    python -m muonq_hf.run SCRIPT [ARGS...]          # or: muonq-hf-run SCRIPT [ARGS...]
    python -m muonq_hf.run -m MODULE [ARGS...]
    torchrun --nproc_per_node 2 -m muonq_hf.run SCRIPT [ARGS...]
    accelerate launch -m muonq_hf.run SCRIPT [ARGS...]

Every launched worker runs this module first, so each interpreter registers ``muonq`` before the script
builds its ``HfArgumentParser`` or unpickles a ``training_args.bin``. The script then runs as ``__main__``
with ``sys.argv = [SCRIPT, *ARGS]`` and its own directory first on ``sys.path``, as ``python SCRIPT`` would.
"""

from __future__ import annotations

import os
import runpy
import sys

from .hf import register

USAGE = "usage: muonq-hf-run SCRIPT [ARGS...]  |  muonq-hf-run -m MODULE [ARGS...]"


def main(argv: list[str] | None = None) -> None:
    """Register MuonQ with transformers, then run SCRIPT (or ``-m MODULE``) with ARGS as its command line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + "\n\n" + (__doc__ or ""), file=sys.stderr if not argv else sys.stdout)
        raise SystemExit(0 if argv else 2)
    register()
    if argv[0] == "-m":
        if len(argv) < 2:
            raise SystemExit(f"muonq-hf-run: -m needs a module name\n{USAGE}")
        module, args = argv[1], argv[2:]
        sys.argv = [module, *args]  # runpy sets argv[0] to the module's file
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return
    script, args = argv[0], argv[1:]
    if not os.path.isfile(script):
        raise SystemExit(f"muonq-hf-run: no such script: {script!r}\n{USAGE}")
    sys.argv = [script, *args]
    sys.path[0] = os.path.dirname(os.path.abspath(script))  # what `python SCRIPT` puts first
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
