"""``python -m commpress ...``: the ``commpress`` command line (see `commpress.cli`).

This is what ``torchrun --nproc-per-node 2 -m commpress run train.py`` starts on every rank.
"""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
