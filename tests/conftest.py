"""Makes tests/scripts (the 2-rank workers and their shared helpers) and examples/ (the corpus loader of the
example script) importable from every test module."""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
for folder in (os.path.join(HERE, "scripts"), os.path.join(os.path.dirname(HERE), "examples")):
    if folder not in sys.path:
        sys.path.insert(0, folder)
