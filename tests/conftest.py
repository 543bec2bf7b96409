"""Makes tests/scripts (the 2-rank workers and their shared helpers) and examples/ (the corpus loader of the
example script) importable from every test module."""

import os
import sys

# The fused kernels run eagerly in the suite: hundreds of tiny shapes would each compile. The compiled kernels
# are compared with the eager ones in tests/test_kernels.py, which switches compiling on.
os.environ.setdefault("MUONQ_HF_COMPILE", "0")

HERE = os.path.dirname(os.path.abspath(__file__))
for folder in (os.path.join(HERE, "scripts"), os.path.join(os.path.dirname(HERE), "examples")):
    if folder not in sys.path:
        sys.path.insert(0, folder)
