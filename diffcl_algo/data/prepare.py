"""``python -m diffcl_algo prepare <la|brats|pancreas> --src SRC --dst DST [--splits_dir DIR] [--overwrite]``.

- ``la``: the field's LA h5 files are already preprocessed; this validates ``<src>`` (layout, every case of
  every list present, values) and reports; with ``--dst`` the report is also written to
  ``<dst>/la_report.json``.
- ``brats``: :func:`~diffcl_algo.data.brats.prepare_brats` (SSL4MIS layout).
- ``pancreas``: :func:`~diffcl_algo.data.pancreas.prepare_pancreas` (MC-Net layout).

Every file is written atomically (temp file then ``os.replace``) and existing outputs are never replaced
without ``--overwrite``; extra flags are passed to the dataset's function (e.g. ``--pixdim 1.0``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from monai.config import PathLike

from diffcl_algo.data.brats import prepare_brats
from diffcl_algo.data.io import LIST_NAMES, DataError, la_datalist
from diffcl_algo.data.pancreas import prepare_pancreas
from diffcl_algo.data.validation import validate_cases
from diffcl_algo.data.writers import check_overwrite, write_text

__all__ = ["prepare", "prepare_la"]


def prepare_la(src: PathLike, dst: PathLike | None = None, num_classes: int = 2, overwrite: bool = False) -> dict:
    """Validate an LA dataset in the field's h5 layout and report on it (writes nothing else).

    Every list of ``LIST_NAMES["la"]`` present in ``src`` (at least ``train.list``) is checked with
    :func:`~diffcl_algo.data.validation.validate_cases`.

    Returns:
        ``{"dataset": "la", "src", "lists": {list: {"cases", "shape_min", "shape_max",
        "foreground_fraction_mean"}}}``; also written to ``<dst>/la_report.json`` when ``dst`` is given.

    Raises:
        DataError: any layout or content problem (see ``validate_cases``).
    """
    root = Path(src)
    names = [n for n in LIST_NAMES["la"] if (root / n).is_file()] or [LIST_NAMES["la"][0]]
    report_path = Path(dst) / "la_report.json" if dst is not None else None
    if report_path is not None:
        check_overwrite([report_path], overwrite)
    lists = {}
    for name in names:
        labeled, _ = la_datalist(root, name)
        infos = validate_cases(labeled, num_classes, progress=True)
        shapes = np.array([i["shape"] for i in infos])
        lists[name] = {
            "cases": len(infos),
            "shape_min": shapes.min(0).tolist(),
            "shape_max": shapes.max(0).tolist(),
            "foreground_fraction_mean": float(np.mean([i["foreground_fraction"] for i in infos])),
        }
    report = {"dataset": "la", "src": str(root), "lists": lists}
    if report_path is not None:
        write_text(report_path, json.dumps(report, indent=2) + "\n")
    return report


def prepare(
    dataset: str,
    src: PathLike,
    dst: PathLike | None = None,
    splits_dir: PathLike | None = None,
    overwrite: bool = False,
    **kwargs: Any,
) -> dict:
    """Prepare (brats, pancreas) or validate (la) a dataset; see the module docstring.

    Args:
        dataset: ``"la"``, ``"brats"`` or ``"pancreas"``.
        src: raw input folder (la: the h5 dataset root).
        dst: output dataset root (optional for la: where to write ``la_report.json``).
        splits_dir: folder holding the split lists to copy into ``dst`` (brats: ``train/val/test.txt``,
            pancreas: ``train/test.list``); never used for la, whose lists live in ``src``.
        overwrite: replace existing outputs.
        kwargs: extra arguments of ``prepare_brats`` / ``prepare_pancreas`` / ``prepare_la``.

    Returns:
        The dataset function's summary dict.
    """
    name = str(dataset).lower()
    if name == "la":
        return prepare_la(src, dst, overwrite=overwrite, **kwargs)
    functions = {"brats": prepare_brats, "pancreas": prepare_pancreas}
    if name not in functions:
        raise ValueError(f"dataset must be one of la, brats, pancreas; got {dataset!r}")
    if dst is None:
        raise DataError(f"prepare {name} needs --dst (output dataset root)")
    return functions[name](src, dst, splits_dir=splits_dir, overwrite=overwrite, **kwargs)
