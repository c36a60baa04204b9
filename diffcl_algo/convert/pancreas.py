"""NIH Pancreas-CT preprocessing into the MC-Net h5 layout (``<dst>/Pancreas_h5/image<id>_norm.h5``).

Published source followed: MC-Net ``data/Pancreas/Pre-processing.ipynb`` (Wu et al., MICCAI 2021), whose h5
files (and 62/20 split) Diff-CL and the MC-Net line of work report on:

1. resample to 1 mm isotropic (B-spline image / nearest label; here ``Spacingd`` bilinear / nearest);
2. soft-tissue window -> [0, 1]: MC-Net uses WL 75 / WW 400 = [-125, 275] HU; Diff-CL section 5.1 states
   [-120, 240] HU, our default (``window`` argument; ``ScaleIntensityRanged(clip=True)``);
3. crop around the pancreas: label bounding box + 25 voxels per side, widened first to at least 96 voxels
   (the patch) when smaller, clipped to the volume, on the two in-plane axes only: MC-Net keeps every slice
   (``crop_z=True`` crops the slice axis the same way, like CoraNet's script);
4. z-score of the cropped volume (``NormalizeIntensityd``), hence the ``_norm`` suffix (``zscore=False``
   stores the [0, 1] window instead).

Inputs: ``<src>/images/PANCREAS_<id>.nii.gz`` (or ``.nii``, or a DICOM series folder ``PANCREAS_<id>/`` as
downloaded from TCIA, read by MONAI's ``PydicomReader`` when ``pydicom`` is installed) and
``<src>/labels/label<id>.nii.gz``. Arrays are kept in their stored voxel order (no reorientation); the image
and label of a case must share the grid.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from monai.config import PathLike
from monai.transforms import (
    Compose,
    LoadImaged,
    NormalizeIntensityd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialCropd,
)
from monai.transforms.utils import generate_spatial_bounding_box
from monai.utils import optional_import
from tqdm import tqdm

from diffcl_algo.convert.writers import check_overwrite, write_h5, write_lists
from diffcl_algo.data.io import LAYOUTS, LIST_NAMES, DataError

__all__ = ["pancreas_cases", "pancreas_crop_box", "prepare_pancreas"]

PANCREAS_HELP = (
    "expected <src>/images/PANCREAS_<id>.nii.gz (or a DICOM series folder PANCREAS_<id>/) and "
    "<src>/labels/label<id>.nii.gz, <id> = 4 digits"
)


def _dicom_series(folder: Path) -> Path:
    """The single folder below ``folder`` holding ``.dcm`` files (TCIA nests study/series folders)."""
    if not optional_import("pydicom")[1]:
        raise DataError(f"{folder} is a DICOM series folder; reading DICOM needs pydicom: pip install pydicom")
    series = sorted({p.parent for p in folder.rglob("*.dcm")})
    if len(series) != 1:
        raise DataError(f"{folder}: expected one DICOM series (folder of .dcm files), found {len(series)}")
    return series[0]


def pancreas_cases(src: PathLike) -> list[tuple[str, Path, Path]]:
    """``(case, image, label)`` per image under ``<src>/images``; ``case`` = ``image<id>`` (the split lists' names).

    Raises:
        DataError: missing folders, images without a 4-digit id or without their label.
    """
    root = Path(src)
    images_dir, labels_dir = root / "images", root / "labels"
    if not images_dir.is_dir() or not labels_dir.is_dir():
        raise DataError(f"{root}: missing images/ or labels/ folder; {PANCREAS_HELP}")
    cases, problems = [], []
    for image in sorted(images_dir.iterdir()):
        if image.name.startswith("."):
            continue
        ids = re.findall(r"\d{4}", image.name)
        if not ids:
            problems.append(f"{image}: no 4-digit case id in the name")
            continue
        labels = [labels_dir / f"label{ids[-1]}{s}" for s in (".nii.gz", ".nii")]
        label = next((p for p in labels if p.is_file()), None)
        if label is None:
            problems.append(f"{image}: label {labels[0]} is missing")
            continue
        cases.append((f"image{ids[-1]}", image, label))
    if problems or not cases:
        raise DataError("\n".join(problems or [f"{images_dir}: no images"]) + f"\n{PANCREAS_HELP}")
    return cases


def pancreas_crop_box(
    label: np.ndarray, margin: int = 25, min_size: int = 96, crop_z: bool = False
) -> tuple[list[int], list[int]]:
    """MC-Net crop box ``(start, end)`` (end exclusive) of a (X, Y, Z) label.

    Per cropped axis: foreground extent (``generate_spatial_bounding_box``), widened by
    ``max(min_size - extent, 0) // 2`` and ``margin`` voxels on each side, clipped to the volume. Hand-written
    because ``CropForegroundd`` has no minimum size and cannot leave one axis uncropped.

    Raises:
        DataError: empty label.
    """
    if not np.any(label):
        raise DataError("empty pancreas label: cannot crop around the pancreas")
    start, end = generate_spatial_bounding_box(label[None])
    axes = 3 if crop_z else 2
    for axis in range(3):
        if axis >= axes:
            start[axis], end[axis] = 0, label.shape[axis]
            continue
        pad = max(min_size - (end[axis] - start[axis]), 0) // 2 + margin
        start[axis], end[axis] = max(start[axis] - pad, 0), min(end[axis] + pad, label.shape[axis])
    return start, end


def prepare_pancreas(
    src: PathLike,
    dst: PathLike,
    splits_dir: PathLike | None = None,
    overwrite: bool = False,
    window: Sequence[float] = (-120.0, 240.0),
    pixdim: float | Sequence[float] | None = 1.0,
    margin: int = 25,
    min_size: int = 96,
    crop_z: bool = False,
    zscore: bool = True,
) -> dict[str, Any]:
    """Preprocess NIH Pancreas-CT into ``<dst>/Pancreas_h5/image<id>_norm.h5`` (``image`` float32, ``label`` uint8).

    Args:
        src: folder with ``images/`` and ``labels/`` (see module docstring).
        dst: output dataset root (``data/Pancreas`` in MC-Net).
        splits_dir: folder with ``train.list`` / ``test.list`` to copy into ``dst`` (the 62/20 MC-Net split);
            ``None`` writes ``all.list``.
        overwrite: replace existing outputs (otherwise refuse before writing anything).
        window: HU window clipped and scaled to [0, 1].
        pixdim: output voxel size in mm; ``None`` keeps the input grid.
        margin: voxels added around the pancreas bounding box.
        min_size: minimum crop extent before the margin (MC-Net: 96, the patch size); 0 disables it.
        crop_z: also crop the slice axis (MC-Net keeps all slices).
        zscore: z-score the cropped image (MC-Net); False stores the [0, 1] window.

    Returns:
        Summary ``{"dataset", "dst", "cases", "lists"}``.
    """
    cases = pancreas_cases(src)
    root = Path(dst)
    outputs = [root / LAYOUTS["pancreas"].format(case=c) for c, _, _ in cases]
    list_names = LIST_NAMES["pancreas"] if splits_dir is not None else ("all.list",)
    check_overwrite(outputs + [root / n for n in list_names], overwrite)
    a_min, a_max = (float(w) for w in window)
    keys = ("image", "label")
    steps: list = [LoadImaged("label", ensure_channel_first=True, image_only=True)]
    if pixdim is not None:
        steps.append(Spacingd(keys, pixdim=pixdim, mode=("bilinear", "nearest")))
    steps.append(ScaleIntensityRanged("image", a_min=a_min, a_max=a_max, b_min=0.0, b_max=1.0, clip=True))
    pipeline = Compose(steps)
    for (case, image_path, label_path), out in zip(tqdm(cases, desc="prepare pancreas", unit="case"), outputs):
        dicom = image_path.is_dir()
        source = _dicom_series(image_path) if dicom else image_path
        loader = LoadImaged("image", reader="PydicomReader" if dicom else None, ensure_channel_first=True)
        try:
            d = pipeline(loader({"image": str(source), "label": str(label_path)}))
        except Exception as e:
            problem = f"{type(e).__name__}: {e}"
            raise DataError(f"case {case}: cannot preprocess {image_path} / {label_path} ({problem})") from e
        if d["image"].shape != d["label"].shape:
            raise DataError(
                f"case {case}: image {image_path} shape {tuple(d['image'].shape[1:])} differs from label "
                f"{label_path} shape {tuple(d['label'].shape[1:])}"
            )
        label = d["label"][0].numpy()
        if not np.isin(label, (0, 1)).all():
            raise DataError(f"case {case}: label {label_path} has values {np.unique(label)[:10]}, expected 0/1")
        try:
            start, end = pancreas_crop_box(label, margin, min_size, crop_z)
        except DataError as e:
            raise DataError(f"case {case}: label {label_path}: {e}") from e
        d = SpatialCropd(keys, roi_start=start, roi_end=end)(d)
        if zscore:
            d = NormalizeIntensityd("image")(d)
        spacing = np.asarray(d["image"].pixdim, dtype=float)
        arrays = {"image": d["image"][0].numpy().astype(np.float32), "label": d["label"][0].numpy().astype(np.uint8)}
        write_h5(out, arrays, {"spacing": spacing, "source": str(image_path), "crop_start": start, "crop_end": end})
    lists = write_lists(root, splits_dir, list_names, [c for c, _, _ in cases], "all.list")
    return {"dataset": "pancreas", "dst": str(root), "cases": len(cases), "lists": lists}
