"""What the bundle configs' expressions and both command lines call on values.

* :func:`check_settings`, :func:`check_choice`: refuse settings that would fail later or mean something else.
* :func:`check_command_line_ids`: the stock ``python -m monai.bundle run`` refuses an option the config lacks
  (``initialize``, before anything runs); :func:`check_override_ids` is the check itself, shared with
  ``python -m diffcl_algo run`` and the Python runner.
* :func:`resume_path`: the ``train_state.pt`` that ``--resume`` names.
* :func:`config_files`: the files of a ``--config_file`` value.
* ``as_bool`` (:func:`diffcl_algo.utils.as_bool`): a switch given as a boolean or a string.

Under the stock command, importing this module (every bundle config's ``imports`` does) also installs
:func:`diffcl_algo.utils.install_cause_hook`: MONAI re-raises an error of a config expression as ``RuntimeError:
Failed to evaluate ConfigExpression ...``, so the cause (an unknown option, a missing dataset folder) would be tens of
lines above the end; the hook prints it as the last line, ``error: <cause>``.
"""

from __future__ import annotations

import difflib
import inspect
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from monai.bundle import ConfigParser, ConfigWorkflow
from monai.bundle.scripts import run as monai_run
from monai.bundle.utils import ID_SEP_KEY

from diffcl_algo.networks.vnet import DOWNSAMPLING_FACTOR
from diffcl_algo.utils import as_bool, install_cause_hook, is_null, parse_value

__all__ = [
    "as_bool",
    "check_choice",
    "check_command_line_ids",
    "check_override_ids",
    "check_settings",
    "config_files",
    "resume_path",
]

#: options of ``python -m monai.bundle run`` that are not config ids
_RUN_OPTIONS = frozenset(inspect.signature(monai_run).parameters) | frozenset(
    inspect.signature(ConfigWorkflow.__init__).parameters
)


def check_settings(patch_size: Sequence[int], val_interval: int, factor: int = DOWNSAMPLING_FACTOR) -> None:
    """Refuse settings that would fail later or silently mean something else (run before any data is read).

    Args:
        patch_size: training patch; every axis must be divisible by ``factor`` (the V-Net halves it 4 times).
        val_interval: iterations between validations; 0 means never, a negative value is an error.
        factor: the network's total downsampling factor.

    Raises:
        ValueError: naming the setting and the rule it breaks.
    """
    if int(val_interval) < 0:
        raise ValueError(f"val_interval must be >= 0 (0: never validate), got {val_interval}.")
    if any(int(p) < factor or int(p) % factor for p in patch_size):
        raise ValueError(
            f"patch_size {tuple(int(p) for p in patch_size)} must be divisible by {factor} (and >= {factor}) on "
            f"every axis: the V-Net downsamples {factor.bit_length() - 1} times by 2."
        )


def check_choice(option: str, value: Any, choices: Sequence[str]) -> None:
    """Refuse a value of ``option`` outside ``choices`` (an expression would otherwise take it for one of them).

    Raises:
        ValueError: naming the option, the value and the choices.
    """
    if value not in choices:
        raise ValueError(f"{option} must be one of {list(choices)}, got {value!r}.")


def resume_path(resume: Union[bool, str, os.PathLike, None], default: Union[str, os.PathLike]) -> Optional[Path]:
    """The ``train_state.pt`` to resume from: ``default`` for a true-ish value, None for a null one
    (:func:`~diffcl_algo.utils.is_null`), else ``resume`` itself (a path)."""
    if is_null(resume):
        return None
    if resume is True or as_bool(resume):
        return Path(default)
    return Path(str(resume).strip())


def config_files(config_file: Union[str, Sequence[str]]) -> list[str]:
    """The config files of a ``--config_file`` value: a path, a comma-separated string, a list or its text."""
    if isinstance(config_file, str):
        value = parse_value(config_file) if config_file.lstrip().startswith("[") else config_file
        if isinstance(value, list):
            return [str(f) for f in value]
        return [f.strip() for f in config_file.split(",")] if "," in config_file else [config_file]
    return [str(f) for f in config_file]


def check_override_ids(config: dict, overrides: Sequence[str], source: str) -> None:
    """Refuse override ids that a config does not have (nested ids: every level must exist).

    MONAI's bundle CLI adds an unknown id as a new, unused value and runs with the default; this stops first.

    Args:
        config: the merged config content (``ConfigParser.get()`` or ``load_config_files``).
        overrides: ids as given on the command line or to the runner (``"num_labeled"``,
            ``"train#trainer#max_epochs"``).
        source: how to name the config in the message (its files, or the bundle and workflow).

    Raises:
        ValueError: naming the unknown option and the closest valid id, e.g. ``unknown option --num_labled:
            bundles/la/configs/train.yaml has no id 'num_labled'; did you mean --num_labeled?``.
    """
    for override in overrides:
        node: Any = config
        path: list[str] = []
        for part in str(override).replace(ID_SEP_KEY, "#").split("#"):
            keys = [str(k) for k in node] if isinstance(node, dict) else [str(i) for i in range(len(node))]
            if part not in keys:
                near = difflib.get_close_matches(part, [k for k in keys if not k.startswith("_")], n=1, cutoff=0.6)
                prefix = "#".join(path + [""])
                hint = f"; did you mean --{prefix}{near[0]}?" if near else ""
                raise ValueError(f"unknown option --{override}: {source} has no id '{prefix}{part}'{hint}")
            node = node[part] if isinstance(node, dict) else node[int(part)]
            path.append(part)
            if not isinstance(node, (dict, list)):
                break


def _is_stock_cli(argv0: str) -> bool:
    return Path(argv0).as_posix().endswith("monai/bundle/__main__.py")


def check_command_line_ids(argv: Optional[Sequence[str]] = None) -> None:
    """Under the stock ``python -m monai.bundle run``: refuse a ``--<id>`` that the ``--config_file`` files lack.

    MONAI adds such an id to the config as a new, unused value (``--num_labled 4`` would train with the default
    ``num_labeled``); called first in every workflow's ``initialize``, this stops before anything runs, naming the
    closest valid id (:func:`check_override_ids`). MONAI's own options (``--config_file``, ``--meta_file``, ...) are
    not config ids. Other callers (``python -m diffcl_algo run``, the Python runner) check their overrides
    themselves, so this does nothing for them.

    Args:
        argv: the command line (default ``sys.argv``).

    Raises:
        ValueError: an unknown id (the message names it, the config files and the closest id).
    """
    argv = list(sys.argv if argv is None else argv)
    if not argv or not _is_stock_cli(argv[0]):
        return
    words, given = argv[1:], {}
    i = next((i for i, w in enumerate(words) if w.startswith("--")), len(words))
    while i < len(words):  # --key value, --key=value, or a bare --flag (fire reads it as True)
        key, eq, value = words[i].lstrip("-").partition("=")
        if not eq and i + 1 < len(words) and not words[i + 1].startswith("--"):
            value, i = words[i + 1], i + 1
        given[key], i = value, i + 1
    if not given.get("config_file"):
        return
    files = config_files(given["config_file"])
    ids = [k for k in given if k not in _RUN_OPTIONS]
    check_override_ids(ConfigParser.load_config_files(files), ids, " + ".join(files))


if sys.argv and _is_stock_cli(sys.argv[0]):
    install_cause_hook()
