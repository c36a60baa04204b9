"""``python -m diffcl_algo <command> ...``: see :mod:`diffcl_algo.cli`."""

from __future__ import annotations

import sys

from diffcl_algo.cli import main

if __name__ == "__main__":
    sys.exit(main())
