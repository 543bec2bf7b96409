"""``python -m fplab rosenbrock|mlp|errgrowth|all [--out DIR] ...``: the lab's command line (``fplab.lab``)."""

import sys

from fplab.lab import main

if __name__ == "__main__":
    sys.exit(main())
