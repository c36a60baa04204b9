"""Auto3DSeg: the ``diffcl`` algorithm template (``templates/diffcl``) and the code its scripts call.

``BundleGen(templates_path_or_url=TEMPLATES_DIR, algos=["diffcl"], ...)`` and
``AutoRunner(templates_path_or_url=TEMPLATES_DIR, algos=["diffcl"], ...)`` use it (docs/auto3dseg.md).
"""

from __future__ import annotations

from diffcl_algo.auto3dseg.config import (
    TEMPLATES_DIR,
    analyze_data,
    fill_hyper_parameters,
    labeled_datalist,
    load_config,
    patch_from_shape,
    skip_reason,
    template_values,
)
from diffcl_algo.auto3dseg.runner import InferClass, fold_split, train, trained_values, training_arguments, validate

__all__ = [
    "TEMPLATES_DIR",
    "InferClass",
    "analyze_data",
    "fill_hyper_parameters",
    "fold_split",
    "labeled_datalist",
    "load_config",
    "patch_from_shape",
    "skip_reason",
    "template_values",
    "train",
    "trained_values",
    "training_arguments",
    "validate",
]
