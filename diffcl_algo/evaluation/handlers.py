"""Evaluator handlers: medpy-equal metric handlers, per-case metric files, per-case progress.

* :class:`MedpyDice`, :class:`MedpyJaccard`, :class:`MedpyHD95`, :class:`MedpyASD`: ``IgniteMetricHandler``s
  like ``monai.handlers.MeanDice``, wrapping :class:`~diffcl_algo.evaluation.metrics.MedpyMetric` (the paper's Tables
  1-4 metrics), so they plug into a bundle's evaluator, e.g.::

      key_val_metric:
        val_mean_dice:
          _target_: diffcl_algo.evaluation.handlers.MedpyDice
          output_transform: "$monai.handlers.from_engine(['pred', 'label'])"

  ``y_pred`` / ``y`` may be 1-channel label maps (foreground ``> 0``) or 2-channel binarised one-hot maps; empty
  masks get the finite values of :func:`~diffcl_algo.evaluation.metrics.case_metrics`.
* :class:`CaseMetricsWriter`: per-case Dice / Jaccard / 95HD / ASD of an evaluation run and its files
  ``metrics.csv``, ``metrics_summary.json``, ``cases.json``, each written atomically.
* :class:`CaseProgress`: ``<desc> case i/n (<case>): Dice d`` as each case finishes (a tqdm bar or log lines).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Mapping

import torch
from ignite.engine import Engine, Events
from monai.config import PathLike
from monai.data import MetaTensor, decollate_batch
from monai.handlers import IgniteMetricHandler
from monai.utils import ImageMetaKey
from monai.utils.enums import MetaKeys
from tqdm import tqdm

from diffcl_algo.data.cases import item_case_name
from diffcl_algo.evaluation.metrics import (
    BOTH_EMPTY_VALUES,
    METRIC_NAMES,
    ONE_EMPTY_DISTANCE,
    ONE_EMPTY_OVERLAP,
    MedpyMetric,
    SpacingLike,
    foreground_dice,
    foreground_mask,
    summarize,
)
from diffcl_algo.utils import write_text

__all__ = [
    "CASES_JSON",
    "EMPTY_CASE_NOTE",
    "METRICS_CSV",
    "SUMMARY_JSON",
    "CaseMetricsWriter",
    "read_case_metrics",
    "CaseProgress",
    "MedpyASD",
    "MedpyDice",
    "MedpyHD95",
    "MedpyJaccard",
    "MedpyMetricHandler",
]

logger = logging.getLogger("diffcl_algo.progress")

#: File names of the evaluation outputs (in ``output_dir``).
METRICS_CSV, SUMMARY_JSON, CASES_JSON = "metrics.csv", "metrics_summary.json", "cases.json"
#: How empty masks are scored (see :func:`diffcl_algo.evaluation.metrics.case_metrics`); copied into
#: ``metrics_summary.json``.
EMPTY_CASE_NOTE = (
    f"no NaN: prediction and label both empty -> {dict(BOTH_EMPTY_VALUES)}; exactly one empty -> "
    f"dice = jaccard = {ONE_EMPTY_OVERLAP}, hd95 = asd = {ONE_EMPTY_DISTANCE} (the diagonal of the volume's "
    "extent, worse than any non-empty prediction); see diffcl_algo.evaluation.metrics.case_metrics"
)


class MedpyMetricHandler(IgniteMetricHandler):
    """Mean of one medpy-equal metric over all cases of an ignite run.

    Args:
        metric_name: ``"dice"``, ``"jaccard"``, ``"hd95"`` or ``"asd"`` (see
            :class:`~diffcl_algo.evaluation.metrics.MedpyMetric`).
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


class _OverlapHandler(MedpyMetricHandler):
    metric = ""

    def __init__(self, output_transform: Callable = lambda x: x, save_details: bool = True) -> None:
        super().__init__(self.metric, output_transform=output_transform, save_details=save_details)


class _DistanceHandler(MedpyMetricHandler):
    metric = ""

    def __init__(
        self, spacing: SpacingLike = None, output_transform: Callable = lambda x: x, save_details: bool = True
    ) -> None:
        super().__init__(self.metric, spacing=spacing, output_transform=output_transform, save_details=save_details)


class MedpyDice(_OverlapHandler):
    """Mean Dice (``medpy.metric.binary.dc``); both-empty cases score 1, one-empty cases 0."""

    metric = "dice"


class MedpyJaccard(_OverlapHandler):
    """Mean Jaccard (``medpy.metric.binary.jc``); both-empty cases score 1, one-empty cases 0."""

    metric = "jaccard"


class MedpyHD95(_DistanceHandler):
    """Mean 95% Hausdorff distance (``medpy.metric.binary.hd95``) in ``spacing`` units (voxels when None).

    Both-empty cases score 0; one-empty cases score the volume diagonal (see ``diffcl_algo.evaluation.metrics``).
    """

    metric = "hd95"


class MedpyASD(_DistanceHandler):
    """Mean average surface distance (``medpy.metric.binary.asd``, prediction -> label) in ``spacing`` units.

    Both-empty cases score 0; one-empty cases score the volume diagonal (see ``diffcl_algo.evaluation.metrics``).
    """

    metric = "asd"


def _items(batch: Any, output: Any) -> list[tuple[Mapping, Mapping]]:
    """Per-case ``(batch, output)`` dicts of an iteration, decollating when the engine did not."""
    if isinstance(output, dict):
        output = decollate_batch(output)
    if isinstance(batch, dict):
        batch = decollate_batch(batch)
    batch = batch if isinstance(batch, (list, tuple)) and len(batch) == len(output) else [{}] * len(output)
    return list(zip(batch, output))


def _path(x: Any) -> str | None:
    """``filename_or_obj`` of a MetaTensor (None when unknown)."""
    path = x.meta.get(ImageMetaKey.FILENAME_OR_OBJ) if isinstance(x, MetaTensor) else None
    return str(path) if path else None


def _is_empty(x: torch.Tensor) -> bool:
    """Whether a channel-first label map (1, *S) or one-hot map (2, *S) has no foreground."""
    return not foreground_mask(x[None]).any()


class CaseMetricsWriter:
    """Ignite handler: per-case Dice / Jaccard / 95HD / ASD of an evaluation run, written to ``output_dir``.

    Every iteration, each case of the (decollated) engine output is scored with
    :func:`~diffcl_algo.evaluation.metrics.case_metrics` (through :class:`MedpyMetric`): ``pred`` and
    ``label`` are channel-first tensors, either label maps (1, *S) (foreground ``> 0``) or binarised one-hot
    maps (2, *S). The case name is that of :func:`~diffcl_algo.data.cases.item_case_name` (``case_key`` of the
    output or batch item, the prediction's case metadata, the image path); a name seen twice raises.

    When the epoch completes (an evaluator runs one epoch), it sets ``engine.state.metrics[prefix + name]`` to the
    mean of each metric and writes, each atomically (temporary file, then ``os.replace``; an interrupted run
    leaves no partial csv/json):

    - ``metrics.csv``: columns ``case, dice, jaccard, hd95, asd`` (full float precision), in evaluation order;
    - ``metrics_summary.json``: ``{"count", "metrics": {name: {"mean", "std"}}, "distance_unit",
      "std": "population (ddof=0)", "empty_case_convention", "empty_prediction": [cases], "empty_label": [cases]}``;
    - ``cases.json``: ``{case: {"image": path, "label": path, "prediction": path or null}}`` (the prediction
      path is ``saved_to`` from ``SaveImaged(savepath_in_metadict=True)``, null when predictions are not saved).

    Args:
        output_dir: folder of the three files (created if missing).
        use_spacing: hd95/asd in physical units from the label's affine (``MetaTensor.pixdim``); False (default):
            voxel units, as the field's test code (``medpy`` without ``voxelspacing``).
        metric_prefix: prefix of the ``engine.state.metrics`` names (e.g. ``"test_"``).
        pred_key, label_key, image_key, case_key: keys of the engine output / batch items.
    """

    def __init__(
        self,
        output_dir: PathLike,
        use_spacing: bool = False,
        metric_prefix: str = "",
        pred_key: str = "pred",
        label_key: str = "label",
        image_key: str = "image",
        case_key: str = "case",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.use_spacing = use_spacing
        self.metric_prefix = metric_prefix
        self.pred_key, self.label_key, self.image_key, self.case_key = pred_key, label_key, image_key, case_key
        self.metric = MedpyMetric("all")
        self.rows: list[dict[str, Any]] = []
        self.cases: dict[str, dict[str, str | None]] = {}
        self.empty_prediction: list[str] = []
        self.empty_label: list[str] = []

    def attach(self, engine: Engine) -> None:
        """Reset on ``EPOCH_STARTED``, score on ``ITERATION_COMPLETED``, write on ``EPOCH_COMPLETED``."""
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def reset(self, engine: Engine | None = None) -> None:
        """Forget the cases of a previous run."""
        self.metric.reset()
        self.rows, self.cases, self.empty_prediction, self.empty_label = [], {}, [], []

    def _case(self, batch_item: Mapping, out: Mapping) -> str:
        case = item_case_name({**batch_item, **out}, keys=(self.pred_key, self.image_key), case_key=self.case_key)
        if case is None:
            raise ValueError(f"CaseMetricsWriter: no '{self.case_key}' key and no image path to name the case.")
        return case

    def iteration_completed(self, engine: Engine) -> None:
        """Score every case of the current iteration's output."""
        for batch_item, out in _items(engine.state.batch, engine.state.output):
            for key in (self.pred_key, self.label_key):
                if key not in out:
                    raise KeyError(f"CaseMetricsWriter: engine output has no '{key}' (keys: {sorted(out)}).")
            case = self._case(batch_item, out)
            if case in self.cases:
                raise ValueError(f"CaseMetricsWriter: case name {case!r} occurs twice; predictions would collide.")
            pred, label = out[self.pred_key], out[self.label_key]
            spacing = None
            if self.use_spacing:
                if not isinstance(label, MetaTensor):
                    raise ValueError("CaseMetricsWriter(use_spacing=True) needs the label as a MetaTensor.")
                spacing = tuple(float(s) for s in label.pixdim)
            values = self.metric(y_pred=[pred], y=[label], spacing=spacing)[0]
            self.rows.append({"case": case, **{n: float(v) for n, v in zip(METRIC_NAMES, values.tolist())}})
            if _is_empty(pred):
                self.empty_prediction.append(case)
            if _is_empty(label):
                self.empty_label.append(case)
            saved = pred.meta.get(MetaKeys.SAVED_TO) if isinstance(pred, MetaTensor) else None
            self.cases[case] = {
                "image": _path(out.get(self.image_key)) or _path(batch_item.get(self.image_key)),
                "label": _path(label),
                "prediction": None if saved is None else str(saved),
            }

    def summary(self) -> dict[str, Any]:
        """The ``metrics_summary.json`` content of the cases scored so far."""
        stats = summarize({n: r[n] for n in METRIC_NAMES} for r in self.rows)
        return {
            "count": len(self.rows),
            "metrics": stats,
            "std": "population (ddof=0)",
            "distance_unit": "mm" if self.use_spacing else "voxel",
            "empty_case_convention": EMPTY_CASE_NOTE,
            "empty_prediction": list(self.empty_prediction),
            "empty_label": list(self.empty_label),
        }

    def epoch_completed(self, engine: Engine) -> None:
        """Set the mean metrics on ``engine.state.metrics`` and write the three files atomically."""
        if not self.rows:
            raise RuntimeError("CaseMetricsWriter: the evaluation produced no cases.")
        summary = self.summary()
        for name, stat in summary["metrics"].items():
            engine.state.metrics[f"{self.metric_prefix}{name}"] = stat["mean"]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=["case", *METRIC_NAMES], lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        write_text(self.output_dir / METRICS_CSV, buffer.getvalue())
        write_text(self.output_dir / SUMMARY_JSON, json.dumps(summary, indent=2) + "\n")
        write_text(self.output_dir / CASES_JSON, json.dumps(self.cases, indent=2) + "\n")


class BarHandler:
    """Base of the progress handlers: a tqdm bar opened by a subclass and closed when its engine completes.

    No ``EXCEPTION_RAISED`` handler: ignite stops re-raising an engine's exceptions once one is registered."""

    bar: tqdm | None = None

    def attach_bar(self, engine: Engine, opened: Any, updated: Any, closed: Any) -> None:
        """Open the bar on ``opened``, call ``self.update`` on ``updated``, close it on ``closed``."""
        engine.add_event_handler(opened, self.open)
        engine.add_event_handler(updated, self.update)
        engine.add_event_handler(closed, self.close)

    def close(self, engine: Engine, *_: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class CaseProgress(BarHandler):
    """Per-case progress of an evaluator: ``<desc> case i/n (<case>): Dice d`` as each case finishes.

    With ``progress`` a tqdm bar (stderr) counts the cases and shows the last case and its Dice; without it each
    case is one INFO line of the ``diffcl_algo.progress`` logger (so it reaches ``train.log``). The Dice is that of
    the foreground of the post-processed ``pred`` and ``label`` (absent without a label, e.g. inference).

    When the run ends, the masks its postprocessing wrote (``SaveImaged(savepath_in_metadict=True)``, the
    ``saved_to`` of each ``pred``) are INFO lines of the same logger, whatever ``progress``: one per mask,
    ``inference: mask of case <case> written to <path>``, then ``inference: <n> masks written to <folder>``.

    Args:
        desc: what runs (``"validation"``, ``"evaluation"``, ``"inference"``).
        progress: show a bar instead of log lines; None: a bar when stderr is a terminal.
    """

    def __init__(self, desc: str = "evaluation", progress: bool | None = None) -> None:
        self.desc = desc
        self.progress = sys.stderr.isatty() if progress is None else bool(progress)
        self.done = 0
        self.started = 0.0
        self.saved: list[tuple[str, str]] = []

    def attach(self, engine: Engine) -> None:
        """Reset on ``EPOCH_STARTED``, report on ``ITERATION_COMPLETED``, close and name the written masks on
        ``EPOCH_COMPLETED``."""
        self.attach_bar(engine, Events.EPOCH_STARTED, Events.ITERATION_COMPLETED, Events.EPOCH_COMPLETED)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.report_saved)

    def open(self, engine: Engine) -> None:
        self.done, self.started, self.saved = 0, time.perf_counter(), []
        if self.progress:
            self.bar = tqdm(total=engine.state.epoch_length, desc=self.desc, unit="case", leave=True)

    def update(self, engine: Engine) -> None:
        output = engine.state.output
        items = decollate_batch(output) if isinstance(output, Mapping) else list(output or [])
        for item in items:
            self.done += 1
            text = item_case_name(item) or "?"
            pred = item.get("pred")
            saved = pred.meta.get(MetaKeys.SAVED_TO) if isinstance(pred, MetaTensor) else None
            if saved:
                self.saved.append((text, str(saved)))
            if item.get("label") is not None and item.get("pred") is not None:
                dice = foreground_dice(foreground_mask(item["pred"][None]), foreground_mask(item["label"][None]))
                text += f": Dice {dice:.4f}"
            if self.bar is not None:
                self.bar.set_postfix_str(text, refresh=False)
                self.bar.update(1)
            else:
                total = engine.state.epoch_length
                elapsed = time.perf_counter() - self.started
                logger.info(f"{self.desc} case {self.done}/{total} ({text}) after {elapsed:.1f} s")

    def report_saved(self, engine: Engine) -> None:
        """Log where each mask of the run was written, then their number and folder(s)."""
        if not self.saved:
            return
        for case, path in self.saved:
            logger.info(f"{self.desc}: mask of case {case} written to {path}")
        folders = sorted({str(Path(path).parent) for _, path in self.saved})
        n = len(self.saved)
        logger.info(f"{self.desc}: {n} mask{'s' if n != 1 else ''} written to {', '.join(folders)}")


def read_case_metrics(output_dir: PathLike) -> dict[str, Any]:
    """What :class:`CaseMetricsWriter` wrote to an evaluation's ``output_dir``, read back.

    Returns:
        ``{"mean": {metric: mean over the cases}, "cases": {case: {metric: value}}}`` (``metrics_summary.json``,
        ``metrics.csv``).
    """
    summary = json.loads((Path(output_dir) / SUMMARY_JSON).read_text())
    with open(Path(output_dir) / METRICS_CSV, newline="") as f:
        cases = {row.pop("case"): {k: float(v) for k, v in row.items()} for row in csv.DictReader(f)}
    return {"mean": {name: stat["mean"] for name, stat in summary["metrics"].items()}, "cases": cases}
