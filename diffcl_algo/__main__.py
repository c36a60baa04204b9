"""``python -m diffcl_algo <command> ...``: see :mod:`diffcl_algo.cli`."""

from __future__ import annotations

import sys

from diffcl_algo.cli import main
from diffcl_algo.utils import install_cause_hook

if __name__ == "__main__":
    install_cause_hook()  # a bug's traceback also ends on its cause, not on MONAI's wrapper
    sys.exit(main())
