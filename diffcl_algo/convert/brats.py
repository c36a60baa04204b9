"""BraTS2019 preprocessing into the SSL4MIS h5 layout (``<dst>/data/<case>.h5``, lists ``train/val/test.txt``).

Protocol (Diff-CL section 5.1, after SSL4MIS ``code/dataloaders/brats_proprecessing.py``): T2-FLAIR only,
whole tumour = ``seg > 0`` (codes 1, 2, 4), 1 mm isotropic, cropped to the brain (nonzero FLAIR), upper
99.9th-percentile clip, z-score over the brain. All steps are MONAI transforms (:func:`brats_transforms`).

Differences from SSL4MIS, on purpose: SSL4MIS keeps the challenge's 1 mm grid (BraTS is distributed at 1 mm;
``Spacingd`` is then a no-op) and stores ``sitk`` arrays, i.e. (Z, Y, X); we store nibabel voxel order (X, Y, Z)
like the LA and Pancreas files, so ``RandRotFlipd`` turns the axial plane. SSL4MIS's crop ``data[min:max]``
drops the last brain slice of each axis and its z-score leaves the background at ``-mean/std``; MONAI's
``CropForegroundd`` keeps it and ``NormalizeIntensityd(nonzero=True)`` leaves the background at 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np
from monai.config import PathLike
from monai.transforms import (
    AsDiscreted,
    ClipIntensityPercentilesd,
    Compose,
    CropForegroundd,
    LoadImaged,
    NormalizeIntensityd,
    Spacingd,
)
from tqdm import tqdm

from diffcl_algo.convert.writers import check_overwrite, write_h5, write_lists
from diffcl_algo.data.io import LAYOUTS, LIST_NAMES, DataError

__all__ = ["brats_cases", "brats_transforms", "prepare_brats"]

BRATS_HELP = (
    "expected the BraTS challenge layout <src>/{HGG,LGG}/<case>/<case>_flair.nii.gz and <case>_seg.nii.gz"
)


def _nifti(folder: Path, stem: str) -> Path | None:
    for suffix in (".nii.gz", ".nii"):
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    return None


def brats_cases(src: PathLike) -> list[tuple[str, Path, Path]]:
    """``(case, flair, seg)`` for every case folder under ``<src>/HGG`` and ``<src>/LGG``, sorted by case.

    Raises:
        DataError: missing ``src`` / grade folders, or case folders without their FLAIR or seg file.
    """
    root = Path(src)
    grades = [root / g for g in ("HGG", "LGG") if (root / g).is_dir()]
    if not grades:
        raise DataError(f"{root}: no HGG/ or LGG/ folder; {BRATS_HELP}")
    cases, problems = [], []
    for folder in sorted((f for g in grades for f in g.iterdir() if f.is_dir()), key=lambda f: f.name):
        flair, seg = _nifti(folder, f"{folder.name}_flair"), _nifti(folder, f"{folder.name}_seg")
        if flair is None or seg is None:
            problems.append(f"{folder}: missing {'FLAIR' if flair is None else 'seg'} file")
        else:
            cases.append((folder.name, flair, seg))
    if problems or not cases:
        raise DataError("\n".join(problems or [f"{root}: no case folders"]) + f"\n{BRATS_HELP}")
    return cases


def brats_transforms(pixdim: float | Sequence[float] = 1.0, upper_percentile: float | None = 99.9) -> Compose:
    """MONAI chain ``{"image": flair, "label": seg}`` -> preprocessed channel-first tensors (1, X, Y, Z).

    Load (channel first) -> whole tumour ``label > 0.5`` -> ``Spacingd(pixdim)`` (bilinear image, nearest label)
    -> ``CropForegroundd`` on the nonzero FLAIR -> ``ClipIntensityPercentilesd(upper=upper_percentile)``
    (SSL4MIS ``MedicalImageDeal(percent=0.999)``; ``None`` skips it) -> ``NormalizeIntensityd(nonzero=True)``.
    """
    keys = ("image", "label")
    steps: list = [
        LoadImaged(keys, ensure_channel_first=True, image_only=True),
        AsDiscreted("label", threshold=0.5),
        Spacingd(keys, pixdim=pixdim, mode=("bilinear", "nearest")),
        CropForegroundd(keys, source_key="image", allow_smaller=True),
    ]
    if upper_percentile is not None:
        steps.append(ClipIntensityPercentilesd("image", lower=None, upper=upper_percentile))
    steps.append(NormalizeIntensityd("image", nonzero=True))
    return Compose(steps)


def prepare_brats(
    src: PathLike,
    dst: PathLike,
    splits_dir: PathLike | None = None,
    overwrite: bool = False,
    pixdim: float | Sequence[float] = 1.0,
    upper_percentile: float | None = 99.9,
) -> dict[str, Any]:
    """Preprocess BraTS2019 into ``<dst>/data/<case>.h5`` (``image`` float32, ``label`` uint8, attrs ``spacing``).

    Args:
        src: challenge folder with ``HGG/`` and ``LGG/`` (see :func:`brats_cases`).
        dst: output dataset root (``data/BraTS2019`` in SSL4MIS).
        splits_dir: folder with ``train.txt`` / ``val.txt`` / ``test.txt`` to copy into ``dst`` (the 250/25/60
            SSL4MIS split); ``None`` writes ``all.txt`` with every prepared case.
        overwrite: replace existing outputs (otherwise refuse before writing anything).
        pixdim: output voxel size in mm.
        upper_percentile: intensity percentile clipped before the z-score (``None``: no clip).

    Returns:
        Summary ``{"dataset", "dst", "cases", "lists"}``.
    """
    cases = brats_cases(src)
    root = Path(dst)
    outputs = [root / LAYOUTS["brats"].format(case=c) for c, _, _ in cases]
    list_names = LIST_NAMES["brats"] if splits_dir is not None else ("all.txt",)
    check_overwrite(outputs + [root / n for n in list_names], overwrite)
    pipeline = brats_transforms(pixdim, upper_percentile)
    spacing = np.broadcast_to(np.asarray(pixdim, dtype=float), (3,))
    for (case, flair, seg), out in zip(tqdm(cases, desc="prepare brats", unit="case"), outputs):
        shapes = nib.load(flair).shape, nib.load(seg).shape
        if shapes[0] != shapes[1]:
            raise DataError(f"case {case}: FLAIR {flair} shape {shapes[0]} differs from seg {seg} shape {shapes[1]}")
        try:
            d = pipeline({"image": str(flair), "label": str(seg)})
        except Exception as e:
            raise DataError(f"case {case}: cannot preprocess {flair} / {seg} ({type(e).__name__}: {e})") from e
        image = d["image"][0].numpy().astype(np.float32)
        label = d["label"][0].numpy().astype(np.uint8)
        write_h5(out, {"image": image, "label": label}, {"spacing": spacing, "source": str(flair)})
    lists = write_lists(root, splits_dir, list_names, [c for c, _, _ in cases], "all.txt")
    return {"dataset": "brats", "dst": str(root), "cases": len(cases), "lists": lists}
