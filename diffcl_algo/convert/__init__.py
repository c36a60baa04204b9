"""Offline dataset conversion: raw challenge data to the field's h5 layouts (LA check / resample, BraTS2019, NIH
Pancreas-CT), their atomic writers, and synthetic datasets of the same forms for tests and the demo. Nothing at
training or inference time imports this package; :mod:`diffcl_algo.data` reads what it writes."""

from __future__ import annotations

from diffcl_algo.convert.brats import brats_transforms, prepare_brats
from diffcl_algo.convert.pancreas import pancreas_crop_box, prepare_pancreas
from diffcl_algo.convert.prepare import prepare, prepare_la
from diffcl_algo.convert.synthetic import make_synthetic_brats_raw, make_synthetic_dataset, make_synthetic_pancreas_raw

__all__ = [
    "brats_transforms",
    "make_synthetic_brats_raw",
    "make_synthetic_dataset",
    "make_synthetic_pancreas_raw",
    "pancreas_crop_box",
    "prepare",
    "prepare_brats",
    "prepare_la",
    "prepare_pancreas",
]
