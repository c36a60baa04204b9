"""Atomic writers for prepared datasets and outputs (:func:`diffcl_algo.utils.atomic_write`).

An interrupted run therefore never leaves a half-written case file or list under its final name (MONAI's
``SaveImage`` writes in place and has no h5 writer).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import h5py
import numpy as np
from monai.config import PathLike

from diffcl_algo.data.io import DataError, read_case_list
from diffcl_algo.utils import atomic_write, write_text

__all__ = ["write_h5", "write_lists", "check_overwrite"]


def write_h5(
    path: Path, arrays: Mapping[str, np.ndarray], attrs: Mapping[str, Any] | None = None, compress: bool = True
) -> None:
    """Write ``arrays`` as h5 datasets plus file ``attrs``, atomically: gzip-compressed (the field's format) or, with
    ``compress=False``, plain (faster to read, larger)."""
    with atomic_write(path) as tmp, h5py.File(tmp, "w") as f:
        for name, array in arrays.items():
            f.create_dataset(name, data=array, compression="gzip" if compress else None)
        for key, value in (attrs or {}).items():
            f.attrs[key] = value


def check_overwrite(paths: Iterable[Path], overwrite: bool) -> None:
    """Raise ``DataError`` naming the outputs that already exist, unless ``overwrite``."""
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        shown = "\n  ".join(existing[:10]) + ("\n  ..." if len(existing) > 10 else "")
        raise DataError(
            f"{len(existing)} output file(s) already exist, refusing to overwrite (pass --overwrite):\n  {shown}"
        )


def write_lists(
    dst: Path, splits_dir: PathLike | None, list_names: Sequence[str], prepared: Sequence[str], all_name: str
) -> list[str]:
    """Copy the split lists ``list_names`` from ``splits_dir`` into ``dst``, else write ``all_name`` (every case).

    Lists are copied verbatim (the field's splits); listed cases that were not prepared give a warning.

    Returns:
        The list file names written.

    Raises:
        DataError: a list file is missing from ``splits_dir``.
    """
    if splits_dir is None:
        write_text(dst / all_name, "".join(f"{c}\n" for c in prepared))
        return [all_name]
    done = set(prepared)
    for name in list_names:
        cases = read_case_list(Path(splits_dir) / name)
        missing = [c for c in cases if c not in done]
        if missing:
            warnings.warn(
                f"{Path(splits_dir) / name}: {len(missing)} listed cases were not prepared, e.g. {missing[:3]}",
                stacklevel=2,
            )
        write_text(dst / name, "".join(f"{c}\n" for c in cases))
    return list(list_names)
