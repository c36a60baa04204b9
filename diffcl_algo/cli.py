"""Command line: ``python -m diffcl_algo <command> [options]``, with help built from each command's docstring.

Each command lives in its own module, imported only when called (``--help`` stays fast and an optional dependency
of one command never breaks another). Options are the function's parameters (``--name value``; a value is read
as a Python / YAML literal, so ``--patch_size "[48, 48, 32]"`` and ``--quick true`` work, as with ``fire``); their
help is the ``Args:`` section of the docstring.

Errors of the kinds a user can fix (:data:`~diffcl_algo.utils.USER_ERRORS`: a missing or malformed file, a bad option
value) end the command with one line, ``error: <cause>``, and exit status 1 (``--traceback`` or ``DIFFCL_TRACEBACK=1``
shows the full traceback); anything else is a bug and keeps its traceback.

Under the stock ``python -m monai.bundle run`` (whose errors in config expressions MONAI re-raises as ``RuntimeError:
Failed to evaluate ...``, the cause tens of lines up), :func:`~diffcl_algo.utils.install_cause_hook` makes the cause the
last line too: the traceback as Python prints it, then ``error: <cause>`` (:func:`~diffcl_algo.utils.print_cause_hook`).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import re
import sys
from typing import Any, Callable, Sequence

from diffcl_algo.utils import (
    USER_ERRORS,
    config_error_cause,
    one_line,
    parse_overrides,
    parse_value,
)

__all__ = [
    "COMMANDS",
    "docstring_args",
    "main",
    "user_error",
]

#: command name -> ("module:function", one-line summary shown by ``python -m diffcl_algo --help``)
COMMANDS = {
    "run": ("diffcl_algo.bundle.run:run", "run a bundle workflow (training / evaluating / inferring), options checked"),
    "demo": ("diffcl_algo.demo:demo", "train and evaluate Diff-CL and a baseline on synthetic data (no download)"),
    "prepare": ("diffcl_algo.convert.prepare:prepare", "check (la) or convert (brats, pancreas) a dataset"),
    "report": ("diffcl_algo.evaluation.report:report", "metric tables, learning curves and overlays of runs"),
    "package": ("diffcl_algo.bundle.package:package", "write a self-contained model-zoo zip of a bundle and weights"),
    "bundles": ("diffcl_algo.bundle.compose:write_bundles", "write (or --check) the bundles' configs from the graph"),
}

_OPT = "_option_"  # argparse dest prefix of the --name spelling of a positional parameter


def docstring_args(func: Callable[..., Any]) -> tuple[str, dict[str, str]]:
    """``(description, {parameter: help})`` from a Google-style docstring (``a, b: text`` documents both)."""
    doc = inspect.getdoc(func) or ""
    description = doc.split("\n\n")[0].replace("\n", " ")
    match = re.search(r"^Args:\n((?:[ \t]+.*\n?|\n)+)", doc, flags=re.M)
    helps: dict[str, str] = {}
    current: list[str] = []
    for line in (match.group(1) if match else "").splitlines():
        entry = re.match(r"^ {4}(\w[\w, ]*):\s*(.*)$", line)
        if entry:
            current = [n.strip() for n in entry.group(1).split(",")]
            for name in current:
                helps[name] = entry.group(2)
        elif line.strip() and current:
            for name in current:
                helps[name] += " " + line.strip()
    return description, {k: v.replace("%", "%%").replace("``", "") for k, v in helps.items()}


def _add_options(parser: argparse.ArgumentParser, func: Callable[..., Any]) -> list[str]:
    """One option per parameter of ``func``; a parameter without a default is also accepted positionally.

    Returns:
        The names of the required parameters.
    """
    _, helps = docstring_args(func)
    required = []
    for name, param in inspect.signature(func).parameters.items():
        if param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
            continue
        text = helps.get(name, "")
        if param.default is inspect.Parameter.empty:
            required.append(name)
            parser.add_argument(name, nargs="?", type=parse_value, help=f"{text} (or --{name})")
            parser.add_argument(f"--{name}", dest=f"{_OPT}{name}", type=parse_value, metavar="VALUE", help=text)
            continue
        bool_default = isinstance(param.default, bool)
        parser.add_argument(
            f"--{name}",
            type=parse_value,
            default=param.default,
            nargs="?" if bool_default else None,
            const=True if bool_default else None,
            metavar="VALUE",
            help=f"{text} (default: {param.default!r})",
        )
    return required


def _load(target: str) -> Callable[..., Any]:
    module_name, func_name = target.split(":")
    return getattr(importlib.import_module(module_name), func_name)


def user_error(error: BaseException) -> BaseException | None:
    """The error to report in one line (the cause under MONAI's config wrappers), None when it is a bug."""
    cause = config_error_cause(error)
    return cause if isinstance(cause, USER_ERRORS) else None


def _takes_kwargs(func: Callable[..., Any]) -> bool:
    return any(p.kind == p.VAR_KEYWORD for p in inspect.signature(func).parameters.values())


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per command (only the chosen command's module is imported)."""
    parser = argparse.ArgumentParser(
        prog="python -m diffcl_algo",
        description="Diff-CL semi-supervised 3D segmentation (MONAI bundles, demo, data preparation, reports). "
        "Use 'python -m diffcl_algo <command> --help' for a command's options.",
    )
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of an error")
    commands = parser.add_subparsers(dest="command", metavar="command")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (target, summary) in COMMANDS.items():
        if name != chosen:
            commands.add_parser(name, help=summary, description=summary)
            continue
        func = _load(target)
        description, _ = docstring_args(func)
        sub = commands.add_parser(name, help=summary, description=description.replace("``", ""))
        required = _add_options(sub, func)
        if hasattr(func, "help_epilog"):
            sub.epilog = func.help_epilog(argv)
            sub.formatter_class = argparse.RawDescriptionHelpFormatter
        if _takes_kwargs(func):
            sub.epilog = (sub.epilog or "") + "\nOther --<name> <value> options are passed on as keyword arguments."
        sub.set_defaults(required=required)
        sub.set_defaults(func=func)
    return parser


def _split_extra(argv: list[str]) -> tuple[list[str], list[str]]:
    """``(argv for argparse, extra --key value items)``: options the chosen command does not declare are set
    aside (they become keyword arguments of a command taking ``**kwargs``, e.g. bundle overrides)."""
    chosen = next((a for a in argv if not a.startswith("-")), None)
    if chosen not in COMMANDS:
        return argv, []
    params = inspect.signature(_load(COMMANDS[chosen][0])).parameters
    known = {f"--{name}" for name in params} | {"-h", "--help", "--traceback"}
    kept, extra = [], []
    items = list(argv)
    while items:
        item = items.pop(0)
        if item.startswith("--") and item.split("=", 1)[0] not in known:
            extra.append(item)
            if "=" not in item and items and not items[0].startswith("--"):
                extra.append(items.pop(0))
        else:
            kept.append(item)
    return kept, extra


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the command; one-line errors (module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    kept, extra = _split_extra(argv)
    args = parser.parse_args(kept)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    func = args.func
    kwargs = {k: v for k, v in vars(args).items() if k not in ("func", "command", "traceback", "required")}
    for name in args.required:
        option = kwargs.pop(f"{_OPT}{name}", None)
        kwargs[name] = option if kwargs.get(name) is None else kwargs[name]
        if kwargs[name] is None:
            parser.error(f"{args.command}: missing {name} (give it as the argument or as --{name})")
    if extra and not _takes_kwargs(func):
        parser.error(f"unrecognized arguments for {args.command}: {' '.join(extra)}")
    try:
        if extra:
            kwargs.update(parse_overrides(extra))
        func(**kwargs)
    except Exception as e:  # noqa: BLE001 - classified below; bugs are re-raised with their traceback
        cause = user_error(e)
        if cause is None or args.traceback or os.environ.get("DIFFCL_TRACEBACK") == "1":
            raise
        print(f"error: {one_line(cause)}", file=sys.stderr)
        return 1
    return 0
