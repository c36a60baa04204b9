"""Train / validation transform chains shared by all bundles (MONAI ``Compose``, usable from bundle YAML).

The field's 3D pipeline (UA-MT ``la_heart.py``, SSL4MIS ``brats2019.py``, MC-Net ``dataset.py``) for training is
``RandomRotFlip -> RandomCrop(patch) -> ToTensor``, where ``RandomCrop`` first zero-pads a volume that is not
larger than the patch. Here it is expressed with MONAI transforms:

- load: :class:`~diffcl_algo.data.io.LoadH5d` (h5 or NIfTI, channel first, MetaTensor), then
  :class:`~diffcl_algo.data.intensity.ScanNormalized` (a raw scan gets the normalisation the h5 files carry);
- :class:`RandRotFlipd`: the field's ``RandomRotFlip``, on the whole volume as in the field (so a 90-degree
  turn never conflicts with a non-square patch);
- pad: ``SpatialPadd`` to at least the patch size (constant 0, like the field's ``np.pad``; the field pads
  ``(patch - size) // 2 + 3`` voxels per side when ``size <= patch``, MONAI pads the minimum, symmetrically);
- ``RandSpatialCropd(random_size=False)``: the field's uniform random crop of ``patch_size``;
- optionally (``normalize=True``) ``NormalizeIntensityd``: a z-score of each whole volume after loading, the same in
  training, validation, evaluation and inference (the field's LA h5 images were z-scored on the whole scan before
  the crop, so their crops are not zero-mean, unit-variance: std 0.31 to 1.3 over the 80 cases);
- ``EnsureTyped``: float32 tensors (labels stay float32 channel-first, MONAI's loss convention).
"""

from __future__ import annotations

from typing import Sequence

import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    EnsureTyped,
    Flipd,
    NormalizeIntensityd,
    OneOf,
    RandRotate90d,
    RandSpatialCropd,
    SpatialPadd,
)
from monai.utils import ensure_tuple

from diffcl_algo.data.intensity import ScanNormalized
from diffcl_algo.data.io import LoadH5d

#: Key under which an unlabeled case keeps its label for pseudo-label monitoring (never trained on).
HIDDEN_LABEL = "hidden_label"

__all__ = ["RandRotFlipd", "train_transforms", "val_transforms"]


class RandRotFlipd(Compose):
    """The field's ``RandomRotFlip`` (UA-MT/SSL4MIS/MC-Net) from MONAI transforms.

    The field draws ``k`` uniformly in {0, 1, 2, 3} and rotates by ``k * 90`` degrees in the plane of spatial axes
    (0, 1), then always flips along spatial axis 0 or 1 (uniformly). MONAI's ``RandRotate90d(prob, max_k=3)``
    draws ``k`` in {1, 2, 3} when it fires, so ``prob=0.75`` gives the same uniform law over {0, 1, 2, 3}; the
    flip is ``OneOf`` two ``Flipd`` (``RandAxisFlipd`` would also pick the third axis). Invertible. Net effect
    (as in the field): one of the 4 in-plane reflections, each with probability 1/4; axis 2 is never touched.

    Args:
        keys: keys of the channel-first tensors to transform together.
        allow_missing_keys: do not raise when a key is absent.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(
            [
                RandRotate90d(keys, prob=0.75, max_k=3, spatial_axes=(0, 1), allow_missing_keys=allow_missing_keys),
                OneOf([Flipd(keys, spatial_axis=a, allow_missing_keys=allow_missing_keys) for a in (0, 1)]),
            ]
        )


def _keys(keys: KeysCollection, labeled: bool) -> tuple:
    keys = ensure_tuple(keys)
    return keys if labeled else tuple(k for k in keys if k != "label")


def load_transforms(
    keys: KeysCollection,
    spacing: float | Sequence[float] | None = None,
    normalize: bool = False,
    scan_norm: str = "zscore",
) -> list:
    """Loading (h5 or NIfTI, channel first), a raw scan's normalisation (:class:`ScanNormalized`, ``scan_norm``)
    and, with ``normalize``, a per-volume z-score of ``"image"``."""
    keys = ensure_tuple(keys)
    datasets = ["label" if k == HIDDEN_LABEL else k for k in keys]  # an unlabeled case's label, for monitoring
    steps: list = [LoadH5d(keys, datasets=datasets, spacing=spacing), ScanNormalized("image", scan_norm)]
    if normalize:
        steps.append(NormalizeIntensityd("image"))
    return steps


def train_transforms(
    patch_size: Sequence[int],
    keys: KeysCollection = ("image", "label"),
    labeled: bool = True,
    spacing: float | Sequence[float] | None = None,
    normalize: bool = False,
    scan_norm: str = "zscore",
) -> Compose:
    """Training chain: load, [z-score], ``RandRotFlipd``, pad to the patch, random ``patch_size`` crop, float tensors.

    Args:
        patch_size: spatial crop size, e.g. (112, 112, 80) for LA, (96, 96, 96) for BraTS / Pancreas.
        keys: data keys; ``"label"`` is dropped when ``labeled`` is False.
        labeled: whether the entries carry a label.
        spacing: voxel size given to :class:`~diffcl_algo.data.io.LoadH5d` for h5 files.
        normalize: z-score each whole image volume (``NormalizeIntensityd``) before augmenting.
        scan_norm: normalisation of raw (non-h5) scans (:class:`~diffcl_algo.data.intensity.ScanNormalized`).

    Returns:
        ``Compose`` mapping ``{"image": path[, "label": path]}`` to tensors of shape (1, *patch_size).
    """
    keys = _keys(keys, labeled)
    patch = tuple(int(p) for p in patch_size)
    if len(patch) != 3:
        raise ValueError(f"patch_size must have 3 entries, got {patch_size}")
    return Compose(
        [
            *load_transforms(keys, spacing, normalize, scan_norm),
            RandRotFlipd(keys),
            SpatialPadd(keys, spatial_size=patch, mode="constant"),
            RandSpatialCropd(keys, roi_size=patch, random_size=False),
            EnsureTyped(keys, dtype=torch.float32),
        ]
    )


def val_transforms(
    keys: KeysCollection = ("image", "label"),
    labeled: bool = True,
    spacing: float | Sequence[float] | None = None,
    normalize: bool = False,
    scan_norm: str = "zscore",
) -> Compose:
    """Validation / test chain: load whole volumes as float32 channel-first tensors (sliding-window inference).

    Args:
        keys: data keys; ``"label"`` is dropped when ``labeled`` is False.
        labeled: whether the entries carry a label.
        spacing: voxel size given to :class:`~diffcl_algo.data.io.LoadH5d` for h5 files.
        normalize: z-score each whole image volume (``NormalizeIntensityd``), as in training.
        scan_norm: normalisation of raw (non-h5) scans (:class:`~diffcl_algo.data.intensity.ScanNormalized`).
    """
    keys = _keys(keys, labeled)
    return Compose([*load_transforms(keys, spacing, normalize, scan_norm), EnsureTyped(keys, dtype=torch.float32)])
