"""The pre- and postprocessing chains of the bundles' evaluation and inference (MONAI transforms).

Evaluation (:func:`eval_preprocessing`, :func:`eval_postprocessing`): whole h5 / NIfTI volumes as training's
validation reads them, named by case; argmax, ``<output_dir>/<case>.nii.gz`` on the volume's own grid.

Inference (:func:`scan_preprocessing`, :func:`scan_postprocessing`): a user's scan in, a mask out on the scan's own
grid.

The field's training data are crops of whole scans, each z-scored on the whole scan before the crop (UA-MT's LA
preprocessing: ``(image - mean) / std`` of the whole NRRD volume, then a crop around the atrium's bounding box in
the two in-plane axes, all slices kept). The field's h5 files hold those images, so they are the network's input
as they are. A user's scan (NIfTI, NRRD or any format MONAI's ``LoadImage`` reads) is brought into the same form by
MONAI transforms, all invertible except the intensity steps:

1. load, channel first (:class:`~diffcl_algo.data.io.LoadH5d`: h5 via the field's reader, anything else via
   ``LoadImage``; ``.nrrd`` needs ``pynrrd`` or ``itk``);
2. :class:`~diffcl_algo.data.intensity.ScanNormalized`: the dataset's normalisation of a raw scan (LA: the
   whole-scan z-score), skipped for the field's h5 files, which store images already normalised;
3. optional region of interest (``roi``, ``SpatialCropd``): a voxel box of the scan, e.g. around the atrium as
   in the field's crop;
4. ``Orientationd`` to the model's axis codes (``orientation``) and ``Spacingd`` to the training voxel size
   (``model_spacing``); the field's h5 files already have both (no-ops there);
5. a z-score of the volume as the network sees it (``NormalizeIntensityd``) when training used one
   (``normalize``: the bundles' ``normalize_intensity``) or when the dataset z-scored its crops (Pancreas);
6. float32 tensor and the case name (:class:`~diffcl_algo.data.cases.CaseNamed`).

:func:`scan_postprocessing` then undoes steps 3-4 on the class probabilities with MONAI's ``Invertd`` (linear
interpolation), takes the argmax and writes ``<output_dir>/<case>.nii.gz`` with ``SaveImaged`` on the input's own
grid and affine (shape, orientation, spacing, obliqueness). :func:`diffcl_algo.inference.predict.predict_scan` runs
the same chain for one file from Python.
"""

from __future__ import annotations

from typing import Any, Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection, PathLike
from monai.transforms import (
    AsDiscreted,
    Compose,
    EnsureTyped,
    Invertd,
    KeepLargestConnectedComponentd,
    NormalizeIntensityd,
    Orientationd,
    Spacingd,
    SpatialCropd,
)

from diffcl_algo.data.cases import CaseNamed, save_prediction
from diffcl_algo.data.intensity import ZSCORE_AFTER_CROP, ScanNormalized
from diffcl_algo.data.io import LoadH5d
from diffcl_algo.data.transforms import val_transforms

__all__ = ["check_roi", "eval_postprocessing", "eval_preprocessing", "scan_postprocessing", "scan_preprocessing"]


class _Spacingd(Spacingd):
    """``Spacingd`` that leaves other entries of the dict alone.

    For a NIfTI input, MONAI's ``Spacingd`` copies the image's metadata into every ``<key>_*`` entry, which fails on
    a plain value such as the ``image_path`` string MONAI Label puts beside ``image``; such entries are set aside
    while it runs.
    """

    def __call__(self, data: Mapping[Hashable, Any], lazy: bool | None = None) -> dict[Hashable, Any]:
        d = dict(data)
        prefixes = tuple(f"{key}_" for key in self.keys)
        aside = {k: d.pop(k) for k in list(d) if str(k).startswith(prefixes) and not isinstance(d[k], dict)}
        return {**super().__call__(d, lazy=lazy), **aside}


def check_roi(roi: Sequence[int] | None) -> tuple[list[int], list[int]] | None:
    """``(start, end)`` voxel indices of a region of interest ``[x0, y0, z0, x1, y1, z1]`` (end exclusive).

    Raises:
        ValueError: not 6 integers with ``0 <= start < end`` on every axis (the message names ``roi``).
    """
    if roi is None:
        return None
    values = [int(v) for v in roi]
    if len(values) != 6 or any(v < 0 for v in values) or any(a >= b for a, b in zip(values[:3], values[3:])):
        raise ValueError(
            f"roi must be 6 voxel indices [x0, y0, z0, x1, y1, z1] with 0 <= start < end on each axis, got {roi}."
        )
    return values[:3], values[3:]


def scan_preprocessing(
    model_spacing: float | Sequence[float] | None = None,
    orientation: str | None = "RAS",
    roi: Sequence[int] | None = None,
    normalize: bool = False,
    spacing: float | Sequence[float] | None = None,
    scan_norm: str = "zscore",
    keys: KeysCollection = "image",
) -> Compose:
    """Inference preprocessing of any scan (module docstring, steps 1-6).

    Args:
        model_spacing: voxel size (mm) the network was trained at; inputs are resampled to it (bilinear). None:
            no resampling.
        orientation: axis codes of the network's input frame (MONAI ``Orientationd``; the field's h5 files read as
            ``"RAS"``). None: the scan's own voxel order.
        roi: voxel box ``[x0, y0, z0, x1, y1, z1]`` of the input scan to segment (clipped to the scan), or None
            for the whole scan.
        normalize: z-score the (cropped, resampled) volume again, as training does with ``normalize_intensity``.
        spacing: voxel size of h5 inputs (see :class:`~diffcl_algo.data.io.LoadH5d`).
        scan_norm: the dataset's normalisation of raw scans (:data:`~diffcl_algo.data.intensity.SCAN_NORMS`).
        keys: image key(s).

    Returns:
        ``Compose`` mapping ``{"image": path[, "case": name]}`` to a float32 MetaTensor (1, *S') in the model's
        frame whose ``applied_operations`` let ``Invertd`` map outputs back to the input grid.
    """
    box = check_roi(roi)
    steps: list = [LoadH5d(keys, spacing=spacing), ScanNormalized(keys, scan_norm)]
    if box is not None:
        steps.append(SpatialCropd(keys, roi_start=box[0], roi_end=box[1]))
    if orientation:
        steps.append(Orientationd(keys, axcodes=str(orientation), labels=(("L", "R"), ("P", "A"), ("I", "S"))))
    if model_spacing is not None:
        steps.append(_Spacingd(keys, pixdim=model_spacing, mode="bilinear"))
    if normalize or scan_norm in ZSCORE_AFTER_CROP:
        steps.append(NormalizeIntensityd(keys))
    steps += [EnsureTyped(keys, dtype=torch.float32), CaseNamed(keys)]
    return Compose(steps)


def _largest_component(keep_largest: int, pred_key: str) -> list:
    """``KeepLargestConnectedComponentd`` of each foreground class ``1..keep_largest - 1`` of a label map (none for
    ``keep_largest`` 0): one structure per class, so islands far from it (false positives) go."""
    if not keep_largest:
        return []
    return [KeepLargestConnectedComponentd(keys=pred_key, applied_labels=list(range(1, int(keep_largest))))]


def scan_postprocessing(
    preprocessing: Compose,
    output_dir: PathLike | None = None,
    argmax: bool = True,
    pred_key: str = "pred",
    image_key: str = "image",
    keep_largest: int = 0,
) -> Compose:
    """Class probabilities back on the input's grid (``Invertd``), argmax, and (with ``output_dir``) the mask file.

    Args:
        preprocessing: the :func:`scan_preprocessing` chain that produced the network input.
        output_dir: where ``<case>.nii.gz`` (uint8, the input's shape and affine) goes; None: nothing written.
        argmax: turn the probabilities (C, *S) into a label map (1, *S) (needed to write the mask).
        pred_key, image_key: keys of the probabilities (C, *S') and of the preprocessed image.
        keep_largest: 0, or the number of classes ``C``: keep the largest connected component of each foreground
            class of the label map (the bundle's ``keep_largest_component``).
    """
    steps: list = [
        Invertd(keys=pred_key, transform=preprocessing, orig_keys=image_key, nearest_interp=False, to_tensor=True)
    ]
    if argmax or output_dir is not None:
        steps += [AsDiscreted(keys=pred_key, argmax=True), *_largest_component(keep_largest, pred_key)]
    if output_dir is not None:
        steps.append(save_prediction(output_dir, pred_key))
    return Compose(steps)


def eval_preprocessing(
    spacing: float | Sequence[float] | None = None,
    case_key: str = "case",
    normalize: bool = False,
    scan_norm: str = "zscore",
) -> Compose:
    """Whole-volume loading (:func:`~diffcl_algo.data.transforms.val_transforms`) followed by :class:`CaseNamed`.

    Args:
        spacing: voxel size given to the h5 reader (None: the file's attribute, else the LA spacing).
        case_key: datalist key of the case name.
        normalize: z-score each image volume, as the model's training did (``normalize_intensity``).
        scan_norm: normalisation of raw (non-h5) scans (:class:`~diffcl_algo.data.intensity.ScanNormalized`).

    Returns:
        ``Compose`` mapping ``{"image": path, "label": path[, "case": name]}`` to float32 MetaTensors (1, *S)
        plus ``"case"``.
    """
    chain = val_transforms(spacing=spacing, normalize=normalize, scan_norm=scan_norm)
    return Compose([chain, CaseNamed("image", case_key=case_key)])


def eval_postprocessing(output_dir: PathLike, save_predictions: bool = True, keep_largest: int = 0) -> Compose:
    """Argmax of ``pred``, then (if ``save_predictions``) ``SaveImaged`` as ``<output_dir>/<case>.nii.gz``.

    The saved prediction is a uint8 label map with the image's spatial shape and affine (no resampling); its
    path is recorded in the prediction's metadata (``saved_to``) for ``cases.json``.

    Args:
        output_dir: where predictions go.
        save_predictions: write the NIfTI predictions.
        keep_largest: 0, or the number of classes: keep the largest connected component of each foreground class.
    """
    transforms: list = [AsDiscreted(keys="pred", argmax=True), *_largest_component(keep_largest, "pred")]
    if save_predictions:
        transforms.append(save_prediction(output_dir))
    return Compose(transforms)
