"""Up-front validation of a datalist, run by training and evaluation before their first step.

MONAI has no dataset checker: its loaders fail lazily, case by case, deep inside a DataLoader worker, with
messages about readers rather than about the dataset. :func:`validate_cases` reads every file once, before any
training, and reports every problem at once as a :class:`~diffcl_algo.data.io.DataError` naming the path.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Sequence

import h5py
import nibabel as nib
import numpy as np
from monai.utils import optional_import
from tqdm import tqdm

from diffcl_algo.data.io import DataError, is_h5

__all__ = ["INFERENCE_INPUT", "TRAINING_INPUT", "validate_cases"]

#: What a datalist with labels (training, evaluation) must hold; the end of :func:`validate_cases`' message.
TRAINING_INPUT = (
    "3D 'image' (float, finite) and 'label' (integers in [0, num_classes)) of the same shape, in one h5 file per "
    "case (datasets 'image'/'label') or in NIfTI / NRRD files"
)
#: What the images to segment (a datalist without labels: inference) must be.
INFERENCE_INPUT = (
    "one 3D image (float, finite) per case to segment: a NIfTI (.nii, .nii.gz), NRRD (.nrrd) or h5 file "
    "(dataset 'image')"
)
NIFTI_SUFFIXES = (".nii", ".nii.gz")
NRRD_SUFFIXES = (".nrrd", ".nhdr")


def _read_nrrd(path: Path, load: bool) -> tuple[tuple[int, ...], np.ndarray | None]:
    """Shape (and array) of an NRRD file via pynrrd, which MONAI's ``NrrdReader`` also uses."""
    nrrd, available = optional_import("nrrd")
    if not available:
        raise DataError(f"{path}: reading NRRD needs pynrrd: pip install 'diffcl_algo[nrrd]' (or pip install pynrrd)")
    if load:
        array, _ = nrrd.read(str(path))
        return tuple(array.shape), array
    return tuple(int(n) for n in nrrd.read_header(str(path))["sizes"]), None


def _read(path: str, datasets: Sequence[str], load: bool) -> dict[str, tuple[tuple[int, ...], np.ndarray | None]]:
    """``{dataset: (shape, array or None)}`` from one file, opened once.

    h5: the named datasets, shapes from metadata, arrays only when ``load``. NIfTI: the volume (``datasets``
    must then hold one name), trailing singleton dimensions dropped.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: file does not exist")
    try:
        if is_h5(p):
            with h5py.File(p, "r") as f:
                absent = [d for d in datasets if d not in f]
                if absent:
                    raise DataError(f"{p}: missing h5 dataset(s) {absent} (found {sorted(f.keys())})")
                return {d: (tuple(f[d].shape), f[d][()] if load else None) for d in datasets}
        if p.name.lower().endswith(NRRD_SUFFIXES):
            shape, array = _read_nrrd(p, load)
            return {d: (shape, array) for d in datasets}
        if not p.name.lower().endswith(NIFTI_SUFFIXES):
            raise DataError(f"{p}: unsupported format (expected .h5, .nii, .nii.gz or .nrrd)")
        img = nib.load(p)
        shape = tuple(img.shape)
        while len(shape) > 3 and shape[-1] == 1:
            shape = shape[:-1]
        return {d: (shape, np.asanyarray(img.dataobj).reshape(shape) if load else None) for d in datasets}
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader failure means an unreadable file
        raise DataError(f"{p}: cannot be read, the file is corrupt or truncated ({type(e).__name__}: {e})") from e


def _check_image(path: str, shape: tuple[int, ...], array: np.ndarray | None) -> None:
    if len(shape) != 3:
        raise DataError(f"{path}: image has shape {shape}, expected a 3D volume (X, Y, Z)")
    if array is not None and array.dtype.kind in "fc" and not np.isfinite(array).all():
        n_nan, n_inf = int(np.isnan(array).sum()), int(np.isinf(array).sum())
        raise DataError(f"{path}: image contains {n_nan} NaN and {n_inf} Inf voxels")
    if array is not None and array.size and array.min() == array.max():
        raise DataError(f"{path}: image is constant (every voxel is {array.flat[0]}): no structure to segment")


def _check_label(
    case: str, path: str, shape: tuple[int, ...], image_shape: tuple[int, ...], array: np.ndarray | None, k: int
) -> float | None:
    """Returns the foreground fraction (``None`` without values)."""
    if shape != image_shape:
        raise DataError(f"{path}: label shape {shape} differs from image shape {image_shape}")
    if array is None:
        return None
    lo, hi = array.min(), array.max()
    integral = array.dtype.kind in "iub" or bool(np.all(array == np.round(array)))
    if lo < 0 or hi >= k or not integral:
        bad = array[(array < 0) | (array >= k) | (array != np.round(array))]
        raise DataError(
            f"{path}: label values {np.unique(bad)[:10].tolist()} outside the integers [0, {k}) (num_classes={k})"
        )
    if hi == 0:
        warnings.warn(f"labeled case {case!r}: label {path} is empty (no foreground voxel)", stacklevel=3)
    return float(np.count_nonzero(array)) / array.size


def _check_entry(entry: dict, num_classes: int, check_values: bool) -> dict[str, Any]:
    image = str(entry["image"])
    label = str(entry["label"]) if "label" in entry else None
    case = str(entry.get("case", Path(image).name))
    if label is not None and label == image and is_h5(image):
        both = _read(image, ("image", "label"), check_values)
        (img_shape, img), (lab_shape, lab) = both["image"], both["label"]
    else:
        img_shape, img = _read(image, ("image",), check_values)["image"]
        lab_shape, lab = _read(label, ("label",), check_values)["label"] if label is not None else ((), None)
    _check_image(image, img_shape, img)
    info: dict[str, Any] = {"case": case, "image": image, "shape": img_shape, "labeled": label is not None}
    if label is not None:
        info["foreground_fraction"] = _check_label(case, label, lab_shape, img_shape, lab, num_classes)
    return info


def validate_cases(
    datalist: Sequence[dict], num_classes: int = 2, check_values: bool = True, progress: bool = False
) -> list[dict[str, Any]]:
    """Check every case of a datalist before training or evaluation.

    Checks, per entry (``{"image": path, ["label": path], ["case": name]}``; h5 or NIfTI; an h5 path used for
    both keys is opened once): the file exists and opens (corrupt/truncated files are caught); h5 files have the
    ``image`` (and, for labeled entries, ``label``) datasets; the image is 3D; label and image shapes match.
    With ``check_values`` the arrays are read (one vectorised pass each): no NaN/Inf in the image, not one value
    everywhere (a constant image, whose z-score is undefined); label values
    are integers in ``[0, num_classes)``; an empty label gives a ``warnings.warn`` naming the case. Without
    ``check_values`` only metadata is read (h5 shapes; NIfTI headers), so truncated data may go unnoticed.

    Args:
        datalist: entries as produced by :func:`~diffcl_algo.data.io.build_datalists`.
        num_classes: number of segmentation classes including background.
        check_values: read the arrays and check their values.
        progress: show a tqdm progress bar (one step per case).

    Returns:
        One dict per entry: ``case``, ``image``, ``shape``, ``labeled`` and, for labeled entries,
        ``foreground_fraction`` (``None`` without ``check_values``).

    Raises:
        DataError: listing every failing entry with its path and problem, then what the files must be: image and
            label (:data:`TRAINING_INPUT`), or, when no entry has a label (inference), an image
            (:data:`INFERENCE_INPUT`).
    """
    if not datalist:
        raise DataError("empty datalist: no case to validate")
    problems, infos = [], []
    for entry in tqdm(datalist, desc="validate", unit="case", disable=not progress):
        if "image" not in entry:
            problems.append(f"datalist entry {entry} has no 'image' key")
            continue
        try:
            infos.append(_check_entry(entry, num_classes, check_values))
        except DataError as e:
            problems.append(str(e))
    if problems:
        labeled = any("label" in entry for entry in datalist)
        raise DataError(
            f"{len(problems)} of {len(datalist)} cases failed validation:\n  "
            + ";\n  ".join(problems)
            + f";\nexpected: {TRAINING_INPUT if labeled else INFERENCE_INPUT}"
        )
    return infos
