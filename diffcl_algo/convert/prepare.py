"""``python -m diffcl_algo prepare <la|brats|pancreas> --src SRC --dst DST [--splits_dir DIR] [--overwrite]``.

- ``la``: the field's LA h5 files are already preprocessed; this validates ``<src>`` (layout, every case of
  every list present, values) and reports; with ``--dst`` the report is also written to
  ``<dst>/la_report.json``. With ``--scale 0.5`` it also writes a resampled copy of every listed case to
  ``<dst>`` in the same layout (the reduced CPU protocol of ``bundles/la/configs/cpu.yaml``).
- ``brats``: :func:`~diffcl_algo.convert.brats.prepare_brats` (SSL4MIS layout).
- ``pancreas``: :func:`~diffcl_algo.convert.pancreas.prepare_pancreas` (MC-Net layout).

Every file is written atomically (temp file then ``os.replace``) and existing outputs are never replaced
without ``--overwrite``; extra flags are passed to the dataset's function (e.g. ``--pixdim 1.0``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from monai.config import PathLike
from monai.transforms import Resize
from tqdm import tqdm

from diffcl_algo.convert.brats import prepare_brats
from diffcl_algo.convert.pancreas import prepare_pancreas
from diffcl_algo.convert.writers import check_overwrite, write_h5, write_text
from diffcl_algo.data.io import LA_SPACING, LAYOUTS, LIST_NAMES, DataError, la_datalist
from diffcl_algo.data.validation import validate_cases

__all__ = ["prepare", "prepare_la", "rescale_case"]


def rescale_case(image: np.ndarray, label: np.ndarray, scale: float, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Resample one case by ``scale`` per axis (output size ``round(size * scale)``).

    The image is averaged over each output voxel's footprint (``area`` interpolation, i.e. anti-aliased); the
    label takes, per output voxel, the class covering most of its footprint (``area`` on the one-hot label, then
    argmax), so small structures are not aliased away as with nearest-neighbour sampling.

    Args:
        image: (H, W, D) float array.
        label: (H, W, D) integer array with values in ``[0, num_classes)``.
        scale: resampling factor, e.g. 0.5 for half resolution.
        num_classes: number of label classes.

    Returns:
        ``(image float32, label uint8)`` of shape ``round((H, W, D) * scale)``.
    """
    size = [max(1, round(s * scale)) for s in image.shape]
    resize = Resize(size, mode="area")
    small = resize(torch.as_tensor(image, dtype=torch.float32)[None])[0]
    onehot = torch.nn.functional.one_hot(torch.as_tensor(label, dtype=torch.long), num_classes)
    votes = resize(onehot.permute(3, 0, 1, 2).float())
    return small.numpy().astype(np.float32), votes.argmax(0).numpy().astype(np.uint8)


def prepare_la(
    src: PathLike, dst: PathLike | None = None, num_classes: int = 2, overwrite: bool = False, scale: float = 1.0
) -> dict:
    """Validate an LA dataset in the field's h5 layout and report on it; with ``scale != 1`` also resample it.

    Every list of ``LIST_NAMES["la"]`` present in ``src`` (at least ``train.list``) is checked with
    :func:`~diffcl_algo.data.validation.validate_cases`. With ``scale != 1``, every listed case is resampled
    with :func:`rescale_case` and written to ``<dst>`` in the same layout, with a ``spacing`` attribute of
    ``LA_SPACING / scale`` (so 95HD / ASD stay in mm), and the lists are copied. Nothing is written before
    every case has passed validation.

    Returns:
        ``{"dataset": "la", "src", "lists": {list: {"cases", "shape_min", "shape_max",
        "foreground_fraction_mean"}}[, "scale", "dst"]}``; also written to ``<dst>/la_report.json`` when ``dst``
        is given.

    Raises:
        DataError: any layout or content problem (see ``validate_cases``); ``scale`` not in (0, 1] or given
        without ``dst``; outputs that exist without ``overwrite``.
    """
    root = Path(src)
    scale = float(scale)
    if not 0 < scale <= 1:
        raise DataError(f"prepare la: --scale must be in (0, 1], got {scale}")
    if scale != 1 and dst is None:
        raise DataError("prepare la: --scale needs --dst (where to write the resampled copy)")
    names = [n for n in LIST_NAMES["la"] if (root / n).is_file()] or [LIST_NAMES["la"][0]]
    report_path = Path(dst) / "la_report.json" if dst is not None else None
    datalists = {name: la_datalist(root, name)[0] for name in names}
    outputs = {}
    if scale != 1:
        outputs = {e["case"]: Path(dst) / LAYOUTS["la"].format(case=e["case"]) for d in datalists.values() for e in d}
        check_overwrite([*outputs.values(), *(Path(dst) / n for n in names)], overwrite)
    if report_path is not None:
        check_overwrite([report_path], overwrite)
    lists = {}
    for name, labeled in datalists.items():
        infos = validate_cases(labeled, num_classes, progress=True)
        shapes = np.array([i["shape"] for i in infos])
        lists[name] = {
            "cases": len(infos),
            "shape_min": shapes.min(0).tolist(),
            "shape_max": shapes.max(0).tolist(),
            "foreground_fraction_mean": float(np.mean([i["foreground_fraction"] for i in infos])),
        }
    report = {"dataset": "la", "src": str(root), "lists": lists}
    if outputs:
        _write_rescaled(datalists, outputs, Path(dst), scale, num_classes)
        report.update(scale=scale, dst=str(dst))
    if report_path is not None:
        write_text(report_path, json.dumps(report, indent=2) + "\n")
    return report


def _write_rescaled(
    datalists: dict[str, list[dict]], outputs: dict[str, Path], dst: Path, scale: float, num_classes: int
) -> None:
    spacing = [s / scale for s in LA_SPACING]
    for entry in tqdm([e for d in datalists.values() for e in d], desc=f"resample x{scale}"):
        with h5py.File(entry["image"], "r") as f:
            image, label = rescale_case(f["image"][()], f["label"][()], scale, num_classes)
        write_h5(outputs[entry["case"]], {"image": image, "label": label}, {"spacing": spacing})
    for name, entries in datalists.items():
        write_text(dst / name, "".join(f"{e['case']}\n" for e in entries))


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
