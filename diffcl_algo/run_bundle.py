"""``python -m diffcl_algo run``: the stock ``python -m monai.bundle run``, with the options checked first.

Same arguments and behaviour as MONAI's bundle CLI (``run_id``, ``--config_file``, ``--<id> <value>`` overrides),
plus:

* an override whose id is not in the config (``--num_labled 4``) stops the run before anything happens, naming
  the closest valid id (:func:`~diffcl_algo.bundles.check_override_ids`, the check of the Python runner
  :mod:`diffcl_algo.training` too; MONAI would silently add it as a new, unused id and train with the default);
* ``--help`` with ``--config_file`` lists the config's value ids with their comments;
* the torch thread count is set (``--num_threads``; default: the idle CPUs, :func:`default_num_threads`);
* the command line reports a user error (missing data, checkpoint, bad value) in one line
  (:mod:`diffcl_algo.cli`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Sequence

from monai.bundle import ConfigParser

from diffcl_algo.bundles import check_override_ids

__all__ = ["config_files", "default_num_threads", "help_epilog", "run"]


def config_files(config_file: str | Sequence[str]) -> list[str]:
    """The config files of a ``--config_file`` value: a path, a comma-separated string or a list."""
    if isinstance(config_file, str):
        return [f.strip() for f in config_file.split(",")] if "," in config_file else [config_file]
    return [str(f) for f in config_file]


def default_num_threads(max_threads: int = 8) -> int | None:
    """Torch CPU threads when none are asked for: ``None`` (torch's own reading) when ``$OMP_NUM_THREADS`` is set,
    else the CPUs this process may use minus the machine's 1-minute load average, between 1 and ``max_threads``.

    On a busy machine every extra thread waits for a core and the run slows down many times over (README,
    "Threads"); on an idle one the threads use the free cores.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cpus - round(busy), max_threads))


def run(
    run_id: str,
    config_file: str | Sequence[str],
    meta_file: str | None = None,
    logging_file: str | None = None,
    num_threads: int | None = None,
    **overrides: Any,
) -> None:
    """Run a bundle workflow like ``python -m monai.bundle run``, refusing unknown options first.

    Example: ``python -m diffcl_algo run training --config_file bundles/la/configs/train.yaml --dataset_dir data/LA``.

    Args:
        run_id: the workflow id: ``training`` (train.yaml), ``evaluating`` (evaluate.yaml), ``inferring``
            (inference.yaml).
        config_file: the bundle config (a list, e.g. "['bundles/la/configs/train.yaml','bundles/la/configs/cpu.yaml']",
            layers later files over earlier ones).
        meta_file: the bundle's metadata.json (default: next to the first config).
        logging_file: logging config (default: logging.conf next to the first config).
        num_threads: torch CPU threads (default: $OMP_NUM_THREADS if set, else the idle CPUs, 1 to 8).
        overrides: --<id> <value> for any id of the config (nested ids as --a#b); see --help with --config_file.

    Raises:
        ValueError: an unknown override id (naming the closest valid id), or any error of the workflow.
    """
    import torch
    from monai.bundle import scripts

    files = config_files(config_file)
    parser = ConfigParser()
    parser.read_config(files)
    check_override_ids(parser.get(), list(overrides), " + ".join(files))
    threads = num_threads if num_threads is not None else default_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    scripts.run(run_id=run_id, config_file=files, meta_file=meta_file, logging_file=logging_file, **overrides)


def _value_ids(path: Path) -> list[tuple[str, str, str]]:
    """``(id, value, comment)`` of the top-level one-line values of a YAML config, in file order."""
    out = []
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z_]\w*):\s*(.*?)\s*(?:#\s*(.*))?$", line)
        if match and match.group(2) and not match.group(2).startswith(("'%", '"%', "%")):
            out.append((match.group(1), match.group(2), match.group(3) or ""))
    return out


def help_epilog(argv: Sequence[str]) -> str:
    """Extra ``--help`` text: the value ids of the ``--config_file`` on the command line, if any."""
    files: list[str] = []
    for i, arg in enumerate(argv):
        if arg == "--config_file" and i + 1 < len(argv):
            files = config_files(_literal_list(argv[i + 1]))
        elif arg.startswith("--config_file="):
            files = config_files(_literal_list(arg.split("=", 1)[1]))
    if not files:
        return "Give --config_file with --help to list that config's options."
    lines = []
    for f in files:
        path = Path(f)
        if not path.is_file():
            return f"config file {f} does not exist."
        lines.append(f"options of {f} (--<id> <value>):")
        lines += [f"  --{k} {v}" + (f"    # {c}" if c else "") for k, v, c in _value_ids(path)]
    return "\n".join(lines)


def _literal_list(text: str) -> str | list[str]:
    from diffcl_algo.cli import parse_value

    value = parse_value(text)
    return value if isinstance(value, (list, str)) else text


run.help_epilog = help_epilog  # type: ignore[attr-defined]
