"""Runtime data: the field's h5 layouts as MONAI transforms / datalists, validation, transforms and the training data
flow (:mod:`diffcl_algo.data.iteration`: one batch per iteration, exactly resumable). Offline conversion (dataset
preparation, writers, synthetic data) is :mod:`diffcl_algo.convert`."""

from __future__ import annotations

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
    "build_datalists",
    "decathlon_datalists",
    "detect_layout",
    "h5_datalist",
    "la_datalist",
    "read_case_list",
    "train_transforms",
    "val_transforms",
    "validate_cases",
]
