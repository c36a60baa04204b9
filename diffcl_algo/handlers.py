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

Training handlers: ``GuardedValidationHandler`` (MONAI's ``ValidationHandler`` plus a policy for a validation round
that raises) and :func:`attach_file_logger` / :func:`detach_file_logger` (the run's ``train.log``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from ignite.engine import Engine
from monai.data import MetaTensor
from monai.handlers import IgniteMetricHandler, ValidationHandler
from monai.utils import ImageMetaKey, ensure_tuple

from diffcl_algo.metrics import METRIC_NAMES, MedpyMetric, SpacingLike

__all__ = [
    "LOG_NAMES",
    "VAL_ERROR_MODES",
    "GuardedValidationHandler",
    "MedpyASD",
    "MedpyDice",
    "MedpyHD95",
    "MedpyJaccard",
    "MedpyMetricHandler",
    "attach_file_logger",
    "detach_file_logger",
]

logger = logging.getLogger(__name__)


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


#: ``GuardedValidationHandler(val_error=...)`` choices.
VAL_ERROR_MODES = ("raise", "continue")


def _failing_cases(evaluator: Engine) -> list[str]:
    """Names of the case(s) an evaluator was processing when it raised.

    From the batch when it was loaded (``"case"`` key, else the image file); when loading itself failed, the
    dataset entries of the batch being read (sequential loader: ``state.iteration`` batches were read before).
    """
    batch = evaluator.state.batch
    items = batch if isinstance(batch, (list, tuple)) else [batch]  # decollated after ITERATION_COMPLETED
    names = []
    for item in items if batch is not None else ():
        if isinstance(item, Mapping) and "case" in item:
            names += [str(c) for c in ensure_tuple(item["case"])]
        elif isinstance(item, Mapping) and isinstance(item.get("image"), MetaTensor):
            names += [str(f) for f in ensure_tuple(item["image"].meta.get(ImageMetaKey.FILENAME_OR_OBJ, ()))]
    if names:
        return names
    loader = getattr(evaluator, "data_loader", None)
    data = getattr(getattr(loader, "dataset", None), "data", None)
    if batch is None and isinstance(data, Sequence):
        size = getattr(loader, "batch_size", None) or 1
        start = int(evaluator.state.iteration) * size
        entries = data[start : start + size]
        return [str(e.get("case", e.get("image"))) if isinstance(e, Mapping) else str(e) for e in entries]
    return []


def _describe(error: BaseException) -> str:
    """``Type: message`` of an exception and of its causes (MONAI wraps reader errors in "applying transform")."""
    parts, seen = [], set()
    while error is not None and id(error) not in seen and len(parts) < 4:
        seen.add(id(error))
        parts.append(f"{type(error).__name__}: {error}")
        error = error.__cause__ or error.__context__
    return " <- caused by ".join(parts)


class GuardedValidationHandler(ValidationHandler):
    """MONAI ``ValidationHandler`` with a policy for a validation round that raises.

    A long run can meet a validation failure that the up-front data check could not see (a file corrupted or
    removed after training started, a transform or an evaluator handler raising). The failure is logged on
    ``diffcl_algo.handlers`` (so in ``train.log``) with the training iteration, the case(s) being validated and the
    error, then, per ``val_error``:

    * ``"raise"``: training stops; a ``RuntimeError`` naming the iteration and the case(s), chained to the
      original exception, propagates out of ``trainer.run()`` (``train_state.pt`` holds the last periodic save).
    * ``"continue"``: the round is skipped (no metric, nothing saved) and training goes on; the next round runs
      normally.

    In both modes ``model.pt`` is untouched by the failed round: ``checkpoint.ModelSaver`` reacts only to a
    completed round (evaluator ``EPOCH_COMPLETED``), so the partial metrics of a failed round are never compared
    with the best, and it only ever replaces ``model.pt`` by a better model.

    Under DDP every rank validates its share of the cases and the metrics are gathered: a failure on one rank
    leaves the others waiting in that gather, so use ``"raise"`` there (torchrun then stops the other ranks).

    Args:
        interval, validator, epoch_level, exec_at_start: as ``monai.handlers.ValidationHandler``.
        val_error: ``"raise"`` (default) or ``"continue"``.
    """

    def __init__(
        self,
        interval: int,
        validator: Optional[Any] = None,
        epoch_level: bool = True,
        exec_at_start: bool = False,
        val_error: str = "raise",
    ) -> None:
        if val_error not in VAL_ERROR_MODES:
            raise ValueError(f"val_error must be one of {VAL_ERROR_MODES}, got {val_error!r}.")
        if int(interval) < 1:
            raise ValueError(f"validation interval must be >= 1, got {interval}.")
        super().__init__(interval, validator, epoch_level, exec_at_start)
        self.val_error = val_error

    def __call__(self, engine: Engine) -> None:
        if self.validator is None:
            raise RuntimeError("GuardedValidationHandler: set the validator before training.")
        try:
            super().__call__(engine)
        except Exception as e:
            # ignite keeps the dead run generator of a run that raised, so the evaluator's next run() would return
            # at once without validating; forget it so the next round runs
            self.validator._internal_run_generator = None
            cases = _failing_cases(self.validator)
            what = f"Validation at iteration {engine.state.iteration} failed on case(s) {cases or 'unknown'}"
            what += f": {_describe(e)}"
            action = "training stops" if self.val_error == "raise" else "round skipped, training continues"
            logger.error(f"{what} ({action}; val_error={self.val_error!r})")
            if self.val_error == "raise":
                raise RuntimeError(what) from e


# MONAI's StatsHandler loggers do not propagate, so the log file is attached to each of them
LOG_NAMES = ("diffcl_algo", "diffcl_algo.train", "diffcl_algo.val")
_FILE_HANDLERS: dict[str, logging.Handler] = {}


def attach_file_logger(output_dir: Union[str, os.PathLike]) -> logging.Handler:
    """Append the ``LOG_NAMES`` loggers (INFO) to ``<output_dir>/train.log``; returns the file handler."""
    key = str(Path(output_dir).resolve())
    detach_file_logger(output_dir)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(Path(output_dir) / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    for name in LOG_NAMES:
        log = logging.getLogger(name)
        log.setLevel(logging.INFO)
        log.addHandler(handler)
    _FILE_HANDLERS[key] = handler
    return handler


def detach_file_logger(output_dir: Union[str, os.PathLike]) -> None:
    """Remove and close the ``train.log`` handler of ``output_dir`` (no-op when none is attached)."""
    handler = _FILE_HANDLERS.pop(str(Path(output_dir).resolve()), None)
    if handler is not None:
        for name in LOG_NAMES:
            logging.getLogger(name).removeHandler(handler)
        handler.close()
