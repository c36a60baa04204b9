"""Command line: ``python -m diffcl_algo <command> ...`` (fire).

Each command lives in its own module and is imported only when called, so ``--help`` stays fast and an
optional dependency of one command never breaks another.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import fire

# command name -> "module:function"
COMMANDS = {
    "bundles": "diffcl_algo.bundles:write_bundles",
    "demo": "diffcl_algo.demo:demo",
    "package": "diffcl_algo.package:package",
    "prepare": "diffcl_algo.data.prepare:prepare",
    "report": "diffcl_algo.report:report",
}


def _lazy(target: str) -> Callable[..., Any]:
    module_name, func_name = target.split(":")

    def run(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module_name), func_name)(*args, **kwargs)

    run.__doc__ = f"See {target}."
    return run


def main() -> None:
    fire.Fire({name: _lazy(target) for name, target in COMMANDS.items()})


if __name__ == "__main__":
    main()
