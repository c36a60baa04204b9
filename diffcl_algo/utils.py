"""What every stage needs once: the process's rank, seeds of the random streams, atomic file writes, switches.

Nothing here imports another module of the package, so every room may import it.

* :func:`rank_world` / :func:`is_main_process`: ``torch.distributed`` rank and world size (``(0, 1)`` without it).
* :class:`SeedStream` and :func:`derive_seed`: every random choice of a training iteration (batch order, augmentation,
  timesteps, noise, sampling, dropout) draws from ``derive_seed(seed, stream, iteration, ...)``, so a run is a pure
  function of ``(seed, iteration)`` and resumes exactly.
* :func:`atomic_write`: a file appears complete under its name or not at all (temporary file in the same folder,
  ``fsync``, ``os.replace``); checkpoints, h5 cases, metrics files, figures and zips are all written through it.
* :func:`as_bool` / :func:`is_null`: a switch or an empty value given as a boolean or as a command-line string;
  :func:`parse_value` / :func:`parse_overrides`: command-line values as Python / YAML, ``--key value`` pairs.
* :func:`config_error_cause`: the error a MONAI config item wrapped, to report it in one line.
"""

from __future__ import annotations

import ast
import contextlib
import enum
import glob
import os
import sys
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any, Iterator, Sequence

import numpy as np
import torch.distributed as dist
import yaml

__all__ = [
    "USER_ERRORS",
    "SeedStream",
    "cause_line",
    "as_bool",
    "atomic_write",
    "config_error_cause",
    "derive_seed",
    "install_cause_hook",
    "is_main_process",
    "is_null",
    "one_line",
    "parse_overrides",
    "parse_value",
    "rank_world",
]

TRUE_STRINGS = ("1", "true", "yes", "on")
NULL_STRINGS = ("", "0", "false", "no", "off", "none", "null")


def rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` of ``torch.distributed``, ``(0, 1)`` when it is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """Whether this process is rank 0 (or the only process): the one that writes files and logs."""
    return rank_world()[0] == 0


class SeedStream(enum.IntEnum):
    """Stream ids of :func:`derive_seed`: different uses of the same ``(seed, iteration)`` never share a state."""

    LABELED = 0  # order of the labeled cases
    UNLABELED = 1  # order of the unlabeled cases
    AUGMENT = 2  # each sample's augmentation
    GLOBAL_RNG = 3  # torch's global generator during an iteration (dropout)
    GENERATOR = 4  # the trainer's own draws (timesteps, noise, memory-bank and feature sampling)


def derive_seed(*keys: int) -> int:
    """A 32-bit seed that is a pure function of non-negative integer ``keys`` (``numpy.random.SeedSequence``)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint32)[0])


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Context manager yielding a temporary path to write; on success it replaces ``path`` atomically.

    The temporary file lies in ``path``'s folder (created if missing), so ``os.replace`` is atomic (POSIX and
    Windows, one file system); it is ``fsync``ed before and the folder after the rename. If the block raises, the
    temporary file is removed, the exception propagates and the previous ``path`` is untouched. A process killed
    mid-write leaves only its ``.<name>.*.tmp``, never a truncated ``path``; the next successful write of the same
    file removes such leftovers. Example::

        with atomic_write("out/metrics.csv") as tmp:
            tmp.write_text(text)

    Args:
        path: the destination file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the permissions open() would
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):  # left by writers killed mid-write
        stale.unlink(missing_ok=True)
    if hasattr(os, "O_DIRECTORY"):  # make the rename durable (POSIX)
        dir_fd = os.open(path.parent, os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (:func:`atomic_write`)."""
    with atomic_write(path) as tmp:
        tmp.write_text(text)



def as_bool(value: Any) -> bool:
    """A switch given as a boolean or as a command-line string (``"true"``, ``"1"``, ``"yes"``, ``"on"``: True)."""
    return value if isinstance(value, bool) else str(value).strip().lower() in TRUE_STRINGS


def is_null(value: Any) -> bool:
    """Whether a config value means "not set": None, False, or a string such as ``""``, ``"none"``, ``"null"``,
    ``"false"``, ``"0"`` (what a command line gives for an empty option)."""
    return value is None or value is False or (isinstance(value, str) and value.strip().lower() in NULL_STRINGS)


def parse_value(text: str) -> Any:
    """A command-line value as Python: a literal (``4``, ``1e-3``, ``[1, 2]``), else YAML (``true``, ``null``),
    else the string itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        pass
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, (bool, type(None), list, dict, int, float)) else text


def parse_overrides(extra: Sequence[str]) -> dict[str, Any]:
    """``--key value`` / ``--key=value`` pairs as ``{key: parse_value(value)}``.

    Raises:
        ValueError: an item that is not ``--key`` followed by a value.
    """
    out: dict[str, Any] = {}
    items = list(extra)
    while items:
        item = items.pop(0)
        if not item.startswith("--") or len(item) < 3:
            raise ValueError(f"unexpected argument {item!r}: options are given as --<name> <value>")
        key, eq, value = item[2:].partition("=")
        if not eq:
            if not items or (items[0].startswith("--") and len(items[0]) > 2):
                raise ValueError(f"option --{key} needs a value")
            value = items.pop(0)
        out[key] = parse_value(value)
    return out


def config_error_cause(error: BaseException) -> BaseException:
    """The exception a MONAI config wrapped (``"Failed to instantiate ..."`` / ``"Failed to evaluate ..."``).

    MONAI re-raises every error of a config item as a ``RuntimeError`` naming the item; this follows
    ``__cause__`` through those wrappers to the original error (e.g. the ``DataError`` naming a missing file).
    """
    while (
        isinstance(error, RuntimeError)
        and str(error).startswith(("Failed to instantiate", "Failed to evaluate"))
        and error.__cause__ is not None
    ):
        error = error.__cause__
    return error


#: Exceptions reported as one line: our own ``DataError`` is a ``ValueError``; missing files are ``OSError``.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)


def one_line(error: BaseException) -> str:
    """An error's message on one line (an ``OSError`` also names its file)."""
    text = " ".join(str(error).split())
    if isinstance(error, OSError) and error.filename and str(error.filename) not in text:
        text = f"{error.filename}: {text}"
    return text or type(error).__name__


def cause_line(error: BaseException) -> str | None:
    """``error: <cause>`` for an error that MONAI's config wrappers hide, None when ``error`` is its own cause.

    A user error (:data:`USER_ERRORS`) is its message in one line; any other cause (a bug) is also named by its type.
    """
    cause = config_error_cause(error)
    if cause is error:
        return None
    text = one_line(cause)
    return f"error: {text}" if isinstance(cause, USER_ERRORS) else f"error: {type(cause).__name__}: {text}"


def print_cause_hook(exc_type: type[BaseException], error: BaseException, traceback: TracebackType | None) -> None:
    """``sys.excepthook``: the traceback as before, then :func:`cause_line` (if any) as the last line of stderr."""
    _previous_hook(exc_type, error, traceback)
    line = cause_line(error)
    if line is not None:
        print(line, file=sys.stderr, flush=True)


_previous_hook = sys.excepthook


def install_cause_hook() -> None:
    """Make :func:`print_cause_hook` the process's ``sys.excepthook`` (once; the previous hook still prints the
    traceback)."""
    global _previous_hook
    if sys.excepthook is not print_cause_hook:
        _previous_hook = sys.excepthook
        sys.excepthook = print_cause_hook
