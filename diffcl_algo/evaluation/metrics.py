"""Binary segmentation metrics equal to ``medpy.metric.binary`` (Dice, Jaccard, 95% Hausdorff, ASD), but faster.

The Diff-CL paper (Sec. 4.1/4.2 and Tables 1-4) reports Dice, Jaccard, 95HD and ASD per case, as computed by the
field's SSL4MIS/UA-MT test code with ``medpy.metric.binary.dc / jc / hd95 / asd``. :func:`case_metrics` returns the
same numbers without depending on medpy:

- ``dice = 2|P & L| / (|P| + |L|)``, ``jaccard = |P & L| / |P | L|``.
- Surfaces follow medpy's ``__surface_distances`` with connectivity 1: ``border(M) = M XOR erode(M)`` where the
  erosion uses the cross-shaped structuring element ``generate_binary_structure(ndim, 1)`` and treats everything
  outside the volume as background (scipy's ``border_value=0``).
- ``d(A, B)`` = for every border voxel of ``A`` (C order), the Euclidean distance (in ``spacing`` units, voxel
  units when ``spacing`` is None) to the nearest border voxel of ``B``, evaluated with scipy's formula
  ``sqrt(sum_i ((j_i - k_i) * spacing_i) ** 2)`` in float64.
- ``hd95 = percentile(concat(d(P, L), d(L, P)), 95)`` (linear interpolation) and ``asd = mean(d(P, L))``
  (medpy's ``asd`` is directed: prediction surface to label surface only).

Why it is faster while staying equal: both volumes are cropped to the bounding box of their union and padded with a
1-voxel zero margin. Outside that box both masks are zero, and outside the volume scipy's erosion assumes zero, so
the margin reproduces the erosion exactly (also where the box touches the volume edge); every border voxel lies in
the box, so nearest-border distances are unchanged. Each border is computed once (by shifted logical ANDs instead of
``binary_erosion``) and each directed distance set once, shared by hd95 and asd (medpy erodes six times and runs three
full-volume distance transforms). Nearest border voxels come from a k-d tree query when the borders are sparse in the
box (the usual case for organ segmentations), and from scipy's exact Euclidean feature transform inside the box when
they are dense or when many voxels are far from the other surface (where k-d tree queries get slow). Both give the
exact nearest voxel, and the distance is then evaluated with scipy's own formula, so results are bitwise identical to
medpy except for possible last-bit differences between two nearest voxels at mathematically equal distance under
non-dyadic anisotropic spacing.

Empty masks (medpy raises ``RuntimeError`` in hd95/asd for them). Fixed, finite values are used instead (no NaN):

- both empty: ``dice = jaccard = 1``, ``hd95 = asd = 0`` (:data:`BOTH_EMPTY_VALUES`; medpy's jc also gives 1, its
  dc intends 1 but returns NaN under NumPy 2, where ``count_nonzero`` yields a NumPy integer and 0/0 no longer
  raises ``ZeroDivisionError``).
- exactly one empty: ``dice = jaccard = 0`` and ``hd95 = asd =`` :func:`volume_diagonal` ``(shape, spacing)``, the
  diagonal of the volume's physical extent ``sqrt(sum_i (shape_i * spacing_i) ** 2)``, which is larger than any
  distance attainable between two voxels of the volume, i.e. a missed or hallucinated structure scores worse than
  any non-empty prediction (:data:`ONE_EMPTY_OVERLAP`, :data:`ONE_EMPTY_DISTANCE`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Union

import numpy as np
import torch
from monai.metrics import CumulativeIterationMetric
from scipy.ndimage import distance_transform_edt, find_objects
from scipy.spatial import cKDTree

__all__ = [
    "BOTH_EMPTY_VALUES",
    "METRIC_NAMES",
    "MedpyMetric",
    "ONE_EMPTY_DISTANCE",
    "ONE_EMPTY_OVERLAP",
    "case_metrics",
    "summarize",
    "volume_diagonal",
]

SpacingLike = Union[float, Sequence[float], np.ndarray, None]

#: Metric keys returned by :func:`case_metrics`, in this order.
METRIC_NAMES: tuple[str, ...] = ("dice", "jaccard", "hd95", "asd")
#: Values when both prediction and label are empty (a correct "nothing there").
BOTH_EMPTY_VALUES: Mapping[str, float] = MappingProxyType({"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0})
#: Dice and Jaccard when exactly one of prediction / label is empty.
ONE_EMPTY_OVERLAP: float = 0.0
#: hd95 and asd when exactly one of prediction / label is empty: :func:`volume_diagonal` of the case.
ONE_EMPTY_DISTANCE: str = "volume_diagonal"

# Nearest-border strategy (all exact; the constants only trade speed). Measured on 2 shared CPU cores with LA-sized
# boxes: the Euclidean feature transform (FT) costs ~0.08 us per box voxel; a k-d tree query ~0.5 us per border voxel
# when the other surface is near, but can visit most of the other surface when it is far (up to ~100 us per query,
# e.g. for a label inside a box-filling prediction). So: FT when the borders are dense in the box; else a k-d tree
# query bounded to _KDTREE_RADIUS_VOXELS, then the voxels without a partner within that radius by an unbounded query
# when (far voxels x other-surface voxels) <= box voxels x _KDTREE_FAR_VISITS_PER_VOXEL (worst-case bound), else by
# the FT.
_KDTREE_MAX_BORDER_FRACTION = 1.0 / 6.0
_KDTREE_RADIUS_VOXELS = 8.0
_KDTREE_FAR_VISITS_PER_VOXEL = 16.0


def volume_diagonal(shape: Sequence[int], spacing: SpacingLike = None) -> float:
    """Diagonal of a volume's physical extent, ``sqrt(sum_i (shape_i * spacing_i) ** 2)``.

    This is the hd95/asd value used when exactly one of prediction / label is empty (:data:`ONE_EMPTY_DISTANCE`).

    Args:
        shape: spatial shape of the volume.
        spacing: voxel spacing per axis (a scalar means isotropic); None means unit spacing.

    Returns:
        The diagonal length in ``spacing`` units.
    """
    extent = np.asarray(shape, dtype=np.float64) * _as_spacing(spacing, len(shape))
    return float(np.sqrt(np.sum(extent * extent)))


def _as_spacing(spacing: SpacingLike, ndim: int) -> np.ndarray:
    """Validate ``spacing`` against ``ndim``; returns a float64 array of length ``ndim`` (ones when None)."""
    if spacing is None:
        return np.ones(ndim, dtype=np.float64)
    arr = np.asarray(spacing, dtype=np.float64)
    if arr.ndim == 0:
        arr = np.full(ndim, float(arr))
    if arr.shape != (ndim,):
        raise ValueError(f"spacing must be a scalar or have one value per axis ({ndim}), got {spacing!r}.")
    if not np.all(np.isfinite(arr) & (arr > 0)):
        raise ValueError(f"spacing values must be finite and positive, got {spacing!r}.")
    return arr


def _border(padded: np.ndarray) -> np.ndarray:
    """Surface voxels ``M XOR erode(M)`` (cross structuring element) of a mask padded by one zero voxel per side.

    Args:
        padded: bool array of shape ``S + 2`` (the mask with a 1-voxel zero margin).

    Returns:
        bool array of shape ``S``: foreground voxels with at least one face neighbour in the background.
    """
    core = tuple(slice(1, -1) for _ in range(padded.ndim))
    mask = padded[core]
    interior = mask.copy()
    for axis in range(padded.ndim):
        for start in (0, 2):
            shifted = list(core)
            shifted[axis] = slice(start, start + mask.shape[axis])
            interior &= padded[tuple(shifted)]
    return mask & ~interior


def _nearest_by_feature_transform(
    src_pts: np.ndarray, dst_border: np.ndarray, spacing: np.ndarray | None
) -> np.ndarray:
    """(N, ndim) index of the nearest ``dst_border`` voxel of every ``src_pts`` row, from scipy's exact EDT."""
    feature = distance_transform_edt(~dst_border, sampling=spacing, return_distances=False, return_indices=True)
    return np.stack([f[tuple(src_pts.T)] for f in feature], axis=1)


def _nearest_border(
    src_pts: np.ndarray, dst_pts: np.ndarray, dst_border: np.ndarray, spacing: np.ndarray | None
) -> np.ndarray:
    """(N, ndim) index of the nearest ``dst`` border voxel of every ``src`` border voxel (exact Euclidean)."""
    if len(src_pts) + len(dst_pts) > dst_border.size * _KDTREE_MAX_BORDER_FRACTION:
        return _nearest_by_feature_transform(src_pts, dst_border, spacing)
    scale = np.ones(dst_border.ndim) if spacing is None else spacing
    radius = _KDTREE_RADIUS_VOXELS * float(scale.max())
    src, tree = src_pts * scale, cKDTree(dst_pts * scale)
    _, index = tree.query(src, distance_upper_bound=radius)
    far = np.flatnonzero(index == len(dst_pts))  # no dst voxel within the radius
    nearest = dst_pts[np.minimum(index, len(dst_pts) - 1)]
    if far.size * len(dst_pts) > dst_border.size * _KDTREE_FAR_VISITS_PER_VOXEL:
        nearest[far] = _nearest_by_feature_transform(src_pts[far], dst_border, spacing)
    elif far.size:
        nearest[far] = dst_pts[tree.query(src[far])[1]]
    return nearest


def _surface_distances(
    src_pts: np.ndarray, dst_pts: np.ndarray, dst_border: np.ndarray, spacing: np.ndarray | None
) -> np.ndarray:
    """Distance from every ``src`` border voxel to the nearest ``dst`` border voxel (medpy ``__surface_distances``).

    Args:
        src_pts: (N, ndim) int indices of the source border voxels (C order).
        dst_pts: (M, ndim) int indices of the destination border voxels, M >= 1.
        dst_border: bool array, the destination border (same voxels as ``dst_pts``).
        spacing: (ndim,) float64 spacing, or None for voxel units.

    Returns:
        (N,) float64 distances, computed exactly as ``scipy.ndimage.distance_transform_edt`` does.
    """
    nearest = _nearest_border(src_pts, dst_pts, dst_border, spacing)
    diff = (nearest - src_pts).astype(np.float64)
    if spacing is not None:
        diff *= spacing
    diff *= diff
    squared = diff[:, 0].copy()
    for axis in range(1, diff.shape[1]):  # same summation order as scipy: ((d0 + d1) + d2) ...
        squared += diff[:, axis]
    return np.sqrt(squared)


def case_metrics(pred: Any, label: Any, spacing: SpacingLike = None) -> dict[str, float]:
    """Dice, Jaccard, 95% Hausdorff distance and average surface distance of one binary case.

    Equal to ``medpy.metric.binary.dc / jc / hd95 / asd(pred, label, voxelspacing=spacing)`` (see the module
    docstring for the definition and the exactness argument), computed on the union bounding box with each surface
    and each directed distance set computed once.

    Empty masks (module constants :data:`BOTH_EMPTY_VALUES`, :data:`ONE_EMPTY_OVERLAP`, :data:`ONE_EMPTY_DISTANCE`):
    both empty -> ``dice = jaccard = 1, hd95 = asd = 0``; exactly one empty -> ``dice = jaccard = 0`` and
    ``hd95 = asd = volume_diagonal(shape, spacing)`` (worst case, finite). Never NaN.

    Args:
        pred: predicted mask, array-like of any shape/ndim (nonzero = foreground).
        label: reference mask, same shape as ``pred`` (nonzero = foreground).
        spacing: voxel spacing per axis (length ``ndim``; a scalar means isotropic). None: voxel units, as medpy.

    Returns:
        ``{"dice": float, "jaccard": float, "hd95": float, "asd": float}``.

    Raises:
        ValueError: if the shapes differ or ``spacing`` does not have one positive value per axis.
    """
    pred_arr = np.atleast_1d(np.asarray(pred))
    label_arr = np.atleast_1d(np.asarray(label))
    if pred_arr.shape != label_arr.shape:
        raise ValueError(f"pred and label shapes must match, got pred {pred_arr.shape} and label {label_arr.shape}.")
    sampling = None if spacing is None else _as_spacing(spacing, pred_arr.ndim)
    pred_mask = pred_arr != 0
    label_mask = label_arr != 0

    box = find_objects((pred_mask | label_mask).view(np.uint8))
    if not box:
        return dict(BOTH_EMPTY_VALUES)
    pred_mask, label_mask = pred_mask[box[0]], label_mask[box[0]]
    n_pred, n_label = np.count_nonzero(pred_mask), np.count_nonzero(label_mask)
    if n_pred == 0 or n_label == 0:
        worst = volume_diagonal(pred_arr.shape, sampling)
        return {"dice": ONE_EMPTY_OVERLAP, "jaccard": ONE_EMPTY_OVERLAP, "hd95": worst, "asd": worst}

    intersection = np.count_nonzero(pred_mask & label_mask)
    pred_border = _border(np.pad(pred_mask, 1))
    label_border = _border(np.pad(label_mask, 1))
    pred_pts, label_pts = np.argwhere(pred_border), np.argwhere(label_border)
    pred_to_label = _surface_distances(pred_pts, label_pts, label_border, sampling)
    label_to_pred = _surface_distances(label_pts, pred_pts, pred_border, sampling)
    return {
        "dice": float(2.0 * intersection / float(n_pred + n_label)),
        "jaccard": float(intersection) / float(n_pred + n_label - intersection),
        "hd95": float(np.percentile(np.hstack((pred_to_label, label_to_pred)), 95)),
        "asd": float(pred_to_label.mean()),
    }


def summarize(rows: Iterable[Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and (population, ``ddof=0``) standard deviation per metric over cases.

    Args:
        rows: per-case metric dicts, e.g. outputs of :func:`case_metrics`; all rows must have the same keys.

    Returns:
        ``{metric: {"mean": float, "std": float}}`` in the key order of the first row.

    Raises:
        ValueError: if ``rows`` is empty, the keys differ between rows, or a value is not finite (no NaN averaging:
            :func:`case_metrics` never returns NaN, so a NaN means an upstream bug and must not be hidden).
    """
    rows = list(rows)
    if not rows:
        raise ValueError("summarize() needs at least one row.")
    keys = list(rows[0])
    for i, row in enumerate(rows):
        if set(row) != set(keys):
            raise ValueError(f"row {i} has keys {sorted(row)}, expected {sorted(keys)}.")
    out = {}
    for key in keys:
        values = np.asarray([row[key] for row in rows], dtype=np.float64)
        if not np.all(np.isfinite(values)):
            raise ValueError(f"metric {key!r} has non-finite values {values[~np.isfinite(values)].tolist()}.")
        out[key] = {"mean": float(values.mean()), "std": float(values.std())}
    return out


def foreground_mask(x: torch.Tensor, name: str = "mask") -> np.ndarray:
    """(B, C, *spatial) tensor -> (B, *spatial) bool: ``x > 0`` when C == 1 (label map), channel 1 when C == 2."""
    if x.ndim < 3:
        raise ValueError(f"{name} must be batch-first (B, C, *spatial), got shape {tuple(x.shape)}.")
    channels = x.shape[1]
    if channels == 1:
        fg = x[:, 0] > 0
    elif channels == 2:
        fg = x[:, 1] > 0.5
    else:
        raise ValueError(f"{name} must have 1 (label) or 2 (one-hot) channels for a binary metric, got {channels}.")
    return fg.cpu().numpy()


def foreground_dice(pred: Any, label: Any) -> float:
    """Dice of the foregrounds (nonzero voxels) of two masks of one shape (tensors or arrays, any device); 1.0 when
    both are empty. The quick Dice of progress lines and pseudo-label monitoring; reports use :func:`case_metrics`."""
    p, g = torch.as_tensor(pred) != 0, torch.as_tensor(label) != 0
    total = int(p.sum()) + int(g.sum())
    return 1.0 if total == 0 else 2.0 * int((p & g).sum()) / total


class MedpyMetric(CumulativeIterationMetric):
    """medpy-equal binary metric(s) as a MONAI ``CumulativeIterationMetric`` (per-case :func:`case_metrics`).

    Inputs follow MONAI's ``DiceMetric``: ``y_pred`` and ``y`` are batch-first tensors (B, C, *spatial) or lists of
    channel-first tensors (C, *spatial). Each may be a discrete label map with C == 1 (foreground = ``value > 0``)
    or a binarised one-hot map with C == 2 (foreground = channel 1 ``> 0.5``), e.g. after
    ``AsDiscrete(argmax=True, to_onehot=2)``; more channels raise ``ValueError``. Empty masks get the documented
    finite values of :func:`case_metrics`.

    Example::

        metric = MedpyMetric("hd95", spacing=(0.625, 0.625, 0.625))
        metric(y_pred=pred_onehot, y=label)  # per-case values (B, 1) are buffered
        metric.aggregate()  # mean over all buffered cases -> 0-d tensor

    Args:
        metric_name: one of ``"dice"``, ``"jaccard"``, ``"hd95"``, ``"asd"``, or ``"all"`` (all four, columns in
            :data:`METRIC_NAMES` order).
        spacing: voxel spacing per spatial axis for hd95/asd (a scalar means isotropic); None: voxel units. Can be
            overridden per call with the ``spacing`` keyword (``metric(y_pred, y, spacing=...)``).
    """

    def __init__(self, metric_name: str = "dice", spacing: SpacingLike = None) -> None:
        super().__init__()
        if metric_name != "all" and metric_name not in METRIC_NAMES:
            raise ValueError(f"metric_name must be one of {METRIC_NAMES + ('all',)}, got {metric_name!r}.")
        self.metric_name = metric_name
        self.spacing = spacing
        self.columns = METRIC_NAMES if metric_name == "all" else (metric_name,)

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        """Per-case metrics of a batch.

        Args:
            y_pred: (B, C, *spatial) prediction, C in {1, 2} (see class docstring).
            y: (B, C', *spatial) reference, C' in {1, 2}, same batch and spatial shape.
            kwargs: optional ``spacing`` overriding the constructor's.

        Returns:
            float64 tensor (B, n_metrics) on ``y_pred``'s device; n_metrics is 4 for ``"all"``, else 1.
        """
        if y is None:
            raise ValueError("MedpyMetric needs the reference y.")
        preds, labels = foreground_mask(y_pred, "y_pred"), foreground_mask(y, "y")
        if preds.shape != labels.shape:
            raise ValueError(
                f"y_pred and y must have the same batch and spatial shape, got {preds.shape} and {labels.shape}."
            )
        spacing = kwargs.get("spacing", self.spacing)
        rows = [case_metrics(p, t, spacing) for p, t in zip(preds, labels)]
        values = [[row[name] for name in self.columns] for row in rows]
        return torch.tensor(values, dtype=torch.float64, device=y_pred.device)

    def aggregate(self) -> torch.Tensor:  # type: ignore[override]
        """Mean over all buffered cases: a 0-d tensor, or shape (4,) for ``metric_name="all"``."""
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError("the data to aggregate must be a PyTorch Tensor.")
        mean = data.mean(dim=0)
        return mean[0] if self.metric_name != "all" else mean
