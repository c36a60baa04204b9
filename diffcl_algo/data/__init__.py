"""Data: the field's h5 layouts as MONAI transforms/datalists, validation, transforms, preparation, synthetic data,
and the training data flow (:mod:`diffcl_algo.data.iteration`: one batch per iteration, exactly resumable)."""

from __future__ import annotations

from diffcl_algo.data.brats import brats_transforms, prepare_brats
from diffcl_algo.data.intensity import SCAN_NORMS, ScanNormalized
from diffcl_algo.data.io import (
    LA_SPACING,
    LAYOUTS,
    LIST_NAMES,
    DataError,
    H5Reader,
    LoadH5d,
    build_datalists,
    decathlon_datalists,
    detect_layout,
    h5_datalist,
    la_datalist,
    read_case_list,
)
from diffcl_algo.data.pancreas import pancreas_crop_box, prepare_pancreas
from diffcl_algo.data.prepare import prepare, prepare_la
from diffcl_algo.data.synthetic import make_synthetic_brats_raw, make_synthetic_dataset, make_synthetic_pancreas_raw
from diffcl_algo.data.transforms import RandRotFlipd, train_transforms, val_transforms
from diffcl_algo.data.validation import validate_cases

__all__ = [
    "LA_SPACING",
    "LAYOUTS",
    "LIST_NAMES",
    "DataError",
    "H5Reader",
    "LoadH5d",
    "RandRotFlipd",
    "SCAN_NORMS",
    "ScanNormalized",
    "brats_transforms",
    "build_datalists",
    "decathlon_datalists",
    "detect_layout",
    "h5_datalist",
    "la_datalist",
    "make_synthetic_brats_raw",
    "make_synthetic_dataset",
    "make_synthetic_pancreas_raw",
    "pancreas_crop_box",
    "prepare",
    "prepare_brats",
    "prepare_la",
    "prepare_pancreas",
    "read_case_list",
    "train_transforms",
    "val_transforms",
    "validate_cases",
]
