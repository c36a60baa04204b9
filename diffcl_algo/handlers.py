"""Ignite metric handlers reporting medpy-equal Dice / Jaccard / 95HD / ASD (the paper's Tables 1-4 metrics).

Built on ``monai.handlers.IgniteMetricHandler`` like ``monai.handlers.MeanDice``, wrapping
:class:`diffcl_algo.metrics.MedpyMetric`, so they plug into MONAI bundle configs, e.g. in an evaluator definition::

    key_val_metric:
      val_mean_dice:
        _target_: diffcl_algo.handlers.MedpyDice
        output_transform: "$monai.handlers.from_engine(['pred', 'label'])"
    additional_metrics:
      val_hd95:
        _target_: diffcl_algo.handlers.MedpyHD95
        spacing: [0.625, 0.625, 0.625]
        output_transform: "$monai.handlers.from_engine(['pred', 'label'])"

``y_pred`` / ``y`` may be 1-channel label maps (foreground ``> 0``) or 2-channel binarised one-hot maps
(foreground = channel 1); empty masks get the finite values documented in :func:`diffcl_algo.metrics.case_metrics`.
The engine metric is the mean over all validation cases; per-case values go to ``engine.state.metric_details``
when ``save_details`` is True.
"""

from __future__ import annotations

from collections.abc import Callable

from monai.handlers import IgniteMetricHandler

from diffcl_algo.metrics import METRIC_NAMES, MedpyMetric, SpacingLike

__all__ = ["MedpyASD", "MedpyDice", "MedpyHD95", "MedpyJaccard", "MedpyMetricHandler"]


class MedpyMetricHandler(IgniteMetricHandler):
    """Mean of one medpy-equal metric over all cases of an ignite run.

    Args:
        metric_name: ``"dice"``, ``"jaccard"``, ``"hd95"`` or ``"asd"`` (see :class:`~diffcl_algo.metrics.MedpyMetric`).
        spacing: voxel spacing per spatial axis for hd95/asd (a scalar means isotropic); None: voxel units.
        output_transform: maps ``engine.state.output`` to ``(y_pred, y)``: batch-first tensors (B, C, *spatial)
            or lists of channel-first tensors, as for ``monai.handlers.MeanDice``.
        save_details: save per-case values to ``engine.state.metric_details[name]`` (shape (num_cases, 1)).
    """

    def __init__(
        self,
        metric_name: str,
        spacing: SpacingLike = None,
        output_transform: Callable = lambda x: x,
        save_details: bool = True,
    ) -> None:
        if metric_name not in METRIC_NAMES:
            raise ValueError(f"metric_name must be one of {METRIC_NAMES}, got {metric_name!r}.")
        metric_fn = MedpyMetric(metric_name=metric_name, spacing=spacing)
        super().__init__(metric_fn=metric_fn, output_transform=output_transform, save_details=save_details)


class MedpyDice(MedpyMetricHandler):
    """Mean Dice (``medpy.metric.binary.dc``); both-empty cases score 1, one-empty cases 0."""

    def __init__(self, output_transform: Callable = lambda x: x, save_details: bool = True) -> None:
        super().__init__("dice", output_transform=output_transform, save_details=save_details)


class MedpyJaccard(MedpyMetricHandler):
    """Mean Jaccard (``medpy.metric.binary.jc``); both-empty cases score 1, one-empty cases 0."""

    def __init__(self, output_transform: Callable = lambda x: x, save_details: bool = True) -> None:
        super().__init__("jaccard", output_transform=output_transform, save_details=save_details)


class MedpyHD95(MedpyMetricHandler):
    """Mean 95% Hausdorff distance (``medpy.metric.binary.hd95``) in ``spacing`` units (voxels when None).

    Both-empty cases score 0; one-empty cases score the volume diagonal (see ``diffcl_algo.metrics``).
    """

    def __init__(
        self, spacing: SpacingLike = None, output_transform: Callable = lambda x: x, save_details: bool = True
    ) -> None:
        super().__init__("hd95", spacing=spacing, output_transform=output_transform, save_details=save_details)


class MedpyASD(MedpyMetricHandler):
    """Mean average surface distance (``medpy.metric.binary.asd``, prediction -> label) in ``spacing`` units.

    Both-empty cases score 0; one-empty cases score the volume diagonal (see ``diffcl_algo.metrics``).
    """

    def __init__(
        self, spacing: SpacingLike = None, output_transform: Callable = lambda x: x, save_details: bool = True
    ) -> None:
        super().__init__("asd", spacing=spacing, output_transform=output_transform, save_details=save_details)
