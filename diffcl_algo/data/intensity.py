"""The intensity normalisation of a raw scan, as each dataset's preprocessed h5 files received it.

The field's h5 files store images already normalised (so they pass through unchanged); a raw scan (NIfTI, NRRD)
gets the same normalisation from :class:`ScanNormalized`, in training, validation, evaluation and inference alike.
Modes (:data:`SCAN_NORMS`), each from MONAI intensity transforms on the whole scan:

- ``"zscore"`` (LA): ``(x - mean) / std`` of the whole scan (``NormalizeIntensity``), UA-MT's LA preprocessing,
  applied before its crop around the atrium;
- ``"zscore_nonzero"`` (BraTS): the upper 99.9th percentile clipped, then the z-score of the nonzero voxels
  (:func:`~diffcl_algo.convert.brats.brats_transforms`);
- ``"ct_window"`` (Pancreas): the soft-tissue window [-120, 240] HU scaled to [0, 1], then the z-score
  (:func:`~diffcl_algo.convert.pancreas.prepare_pancreas` z-scores the volume cropped around the pancreas, so inference
  z-scores again after its region of interest: :data:`ZSCORE_AFTER_CROP`);
- ``"none"``: intensities as stored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Hashable, Mapping

from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    ClipIntensityPercentiles,
    Compose,
    MapTransform,
    NormalizeIntensity,
    ScaleIntensityRange,
)
from monai.utils import ImageMetaKey

from diffcl_algo.data.io import is_h5

__all__ = ["SCAN_NORMS", "ZSCORE_AFTER_CROP", "ScanNormalized"]

SCAN_NORMS = ("zscore", "zscore_nonzero", "ct_window", "none")
#: Modes whose dataset z-scored the cropped volume, not the whole scan (the z-score is taken again after an ROI).
ZSCORE_AFTER_CROP = ("ct_window",)


def _normalizer(mode: str) -> Compose:
    if mode == "zscore":
        return Compose([NormalizeIntensity()])
    if mode == "zscore_nonzero":
        return Compose([ClipIntensityPercentiles(lower=None, upper=99.9), NormalizeIntensity(nonzero=True)])
    if mode == "ct_window":
        return Compose(
            [ScaleIntensityRange(a_min=-120.0, a_max=240.0, b_min=0.0, b_max=1.0, clip=True), NormalizeIntensity()]
        )
    return Compose([])


class ScanNormalized(MapTransform):
    """Normalise each raw scan like the dataset's h5 files; images read from h5 files pass through unchanged.

    Args:
        keys: keys of loaded MetaTensors (1, *S); the source file is their ``filename_or_obj`` metadata.
        mode: one of :data:`SCAN_NORMS` (module docstring).
        allow_missing_keys: do not raise when a key is absent.

    Raises:
        ValueError: an unknown ``mode`` (the message names the option ``scan_norm``).
    """

    def __init__(self, keys: KeysCollection = "image", mode: str = "zscore", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if mode not in SCAN_NORMS:
            raise ValueError(f"scan_norm must be one of {SCAN_NORMS}, got {mode!r}.")
        self.mode = mode
        self.normalize = _normalizer(mode)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Return a copy of ``data`` with each raw scan normalised (h5 images untouched)."""
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            source = image.meta.get(ImageMetaKey.FILENAME_OR_OBJ) if isinstance(image, MetaTensor) else None
            if not (isinstance(source, (str, Path)) and is_h5(source)):
                d[key] = self.normalize(image)
        return d
