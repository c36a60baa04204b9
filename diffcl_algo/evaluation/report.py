"""Training / evaluation report: metric tables, learning curves, best and worst case overlays.

``python -m diffcl_algo report --run_dir R [--eval_dir E] [--output_dir O]`` or :func:`report` writes into
``output_dir`` (default ``<run_dir>/report``):

- ``metrics.md`` / ``metrics.csv``: per-case Dice, Jaccard, 95HD, ASD and mean ± std (population std, as
  :func:`diffcl_algo.evaluation.metrics.summarize`) of each run, from ``<eval_dir>/metrics.csv`` (written by
  :class:`diffcl_algo.evaluation.handlers.CaseMetricsWriter`); several runs side by side with ``runs=``;
- ``curves.png``: one panel per TensorBoard scalar tag found in the run directories (the trainer's loss terms
  ``loss_sup_cs`` ... ``loss``, ``ramp``, learning rates, validation ``val_mean_dice`` ...), one line per run;
- ``overlay_best.png`` / ``overlay_worst.png``: the case with the highest / lowest Dice of the first run with an
  evaluation, axial / coronal / sagittal slices with ground-truth (green) and predicted (magenta) contours on the
  image; one row per run that predicted that case. The best case is cut through the label's centre of mass, the
  worst one where that run errs most: along each axis, the slice with the most false positive + false negative
  voxels (the label's centre where its prediction has no error).

Several runs (e.g. Diff-CL vs supervised-only)::

    report(runs={"Diff-CL": ("out/diffcl", "out/diffcl/eval"), "supervised": ("out/sup", "out/sup/eval")},
           output_dir="out/report")

From the command line, ``--runs '{"Diff-CL": ["out/diffcl", "out/diffcl/eval"], ...}'``.

Figures use matplotlib's Agg canvas directly (no ``pyplot``, so the caller's backend is untouched). Every input
is read and checked before anything is written; a missing input raises ``FileNotFoundError`` naming the file.
Output files are written atomically (:func:`diffcl_algo.utils.atomic_write`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
from monai.config import PathLike
from monai.utils import optional_import
from scipy.ndimage import center_of_mass

from diffcl_algo.data import LoadH5d
from diffcl_algo.evaluation.handlers import CASES_JSON, METRICS_CSV, SUMMARY_JSON
from diffcl_algo.evaluation.metrics import METRIC_NAMES, summarize
from diffcl_algo.utils import atomic_write, write_text

Figure, _ = optional_import("matplotlib.figure", name="Figure")
Line2D, _ = optional_import("matplotlib.lines", name="Line2D")
EventAccumulator, _ = optional_import("tensorboard.backend.event_processing.event_accumulator", name="EventAccumulator")

__all__ = ["EVENT_GLOB", "format_mean_std", "load_scalars", "report"]

#: TensorBoard event files read from a run directory (the trainer's ``SummaryWriter(log_dir=output_dir)``).
EVENT_GLOB = "events.out.tfevents.*"
_HEADERS = {"dice": "Dice (%)", "jaccard": "Jaccard (%)", "hd95": "95HD", "asd": "ASD"}
_PERCENT = {"dice", "jaccard"}
_GT_COLOR, _PRED_COLOR = "#00e000", "#ff00ff"
RunSpec = Union[PathLike, Sequence[Optional[PathLike]], Mapping[str, Optional[PathLike]]]


@dataclass
class _Run:
    """One run's inputs, read and checked."""

    name: str
    run_dir: Optional[Path] = None
    eval_dir: Optional[Path] = None
    scalars: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, dict[str, float]] = field(default_factory=dict)
    cases: dict[str, dict[str, Optional[str]]] = field(default_factory=dict)
    distance_unit: str = "voxel"


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {what}")
    return path


def load_scalars(run_dir: PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """All scalar series of the TensorBoard event files directly in ``run_dir``.

    Args:
        run_dir: training output directory.

    Returns:
        ``{tag: (steps (N,) int64, values (N,) float64)}`` in the order the tags were first written, steps
        increasing; when a step was logged more than once (e.g. after a resume) the last value is kept.

    Raises:
        FileNotFoundError: ``run_dir`` or its event files are missing.
        ValueError: the event files hold no scalars.
    """
    run_dir = _need(Path(run_dir), "the training run directory does not exist")
    if not sorted(run_dir.glob(EVENT_GLOB)):
        raise FileNotFoundError(
            f"{run_dir / EVENT_GLOB} not found: no TensorBoard event file in the run directory (training writes "
            "it into its output_dir)"
        )
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    out = {}
    for tag in accumulator.Tags()["scalars"]:
        series = {e.step: e.value for e in accumulator.Scalars(tag)}
        steps = np.asarray(sorted(series), dtype=np.int64)
        out[tag] = (steps, np.asarray([series[s] for s in steps], dtype=np.float64))
    if not out:
        raise ValueError(f"{run_dir / EVENT_GLOB}: the TensorBoard event files contain no scalars")
    return out


def _read_eval(run: _Run) -> None:
    """Fill ``run.rows / stats / cases / distance_unit`` from ``run.eval_dir``."""
    eval_dir = _need(run.eval_dir, f"evaluation directory of run {run.name!r} does not exist")
    hint = "run the evaluation first (diffcl_algo.evaluation.evaluate or the bundle's 'evaluating' workflow)"
    metrics_csv = _need(eval_dir / METRICS_CSV, hint)
    with metrics_csv.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = {"case", *METRIC_NAMES} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{metrics_csv}: missing columns {sorted(missing)}")
        run.rows = [{"case": r["case"], **{n: float(r[n]) for n in METRIC_NAMES}} for r in reader]
    if not run.rows:
        raise ValueError(f"{metrics_csv} has no cases")
    run.stats = summarize({n: r[n] for n in METRIC_NAMES} for r in run.rows)
    run.cases = json.loads(_need(eval_dir / CASES_JSON, hint).read_text())
    summary_json = eval_dir / SUMMARY_JSON
    if summary_json.exists():
        run.distance_unit = json.loads(summary_json.read_text()).get("distance_unit", run.distance_unit)


def _as_run(name: str, spec: RunSpec) -> _Run:
    """A ``runs`` value: ``(run_dir, eval_dir)``, ``{"run_dir": .., "eval_dir": ..}`` or a bare ``run_dir``."""
    if isinstance(spec, Mapping):
        unknown = set(spec) - {"run_dir", "eval_dir"}
        if unknown:
            raise ValueError(f"run {name!r}: unknown keys {sorted(unknown)} (expected run_dir, eval_dir)")
        run_dir, eval_dir = spec.get("run_dir"), spec.get("eval_dir")
    elif isinstance(spec, (str, os.PathLike)):
        run_dir, eval_dir = spec, None
    else:
        if len(spec) != 2:
            raise ValueError(f"run {name!r}: expected (run_dir, eval_dir), got {spec!r}")
        run_dir, eval_dir = spec
    if run_dir is None and eval_dir is None:
        raise ValueError(f"run {name!r}: give a run_dir, an eval_dir or both")
    return _Run(name, None if run_dir is None else Path(run_dir), None if eval_dir is None else Path(eval_dir))


def format_mean_std(name: str, mean: float, std: float) -> str:
    """``"mean ± std"`` as in the tables: Dice / Jaccard in percent, distances, all with 2 decimals."""
    scale = 100.0 if name in _PERCENT else 1.0
    return f"{mean * scale:.2f} ± {std * scale:.2f}"


def _format_value(name: str, value: float) -> str:
    return f"{value * (100.0 if name in _PERCENT else 1.0):.2f}"


def _header(name: str, unit: str) -> str:
    return _HEADERS[name] if name in _PERCENT else f"{_HEADERS[name]} ({unit})"


def _metrics_markdown(runs: list[_Run]) -> str:
    """Summary table (one row per run) and per-case table (one column group per run)."""
    unit = runs[0].distance_unit
    lines = ["# Evaluation metrics", "", "## Mean ± std over cases", ""]
    lines += ["| run | cases | " + " | ".join(_header(n, unit) for n in METRIC_NAMES) + " |"]
    lines += ["|---" * (len(METRIC_NAMES) + 2) + "|"]
    for run in runs:
        cells = [format_mean_std(n, run.stats[n]["mean"], run.stats[n]["std"]) for n in METRIC_NAMES]
        lines.append(f"| {run.name} | {len(run.rows)} | " + " | ".join(cells) + " |")
    lines += ["", "## Per case", ""]
    columns = [(run, n) for run in runs for n in METRIC_NAMES]
    prefix = (lambda run: f"{run.name} ") if len(runs) > 1 else (lambda run: "")
    lines.append("| case | " + " | ".join(f"{prefix(run)}{_header(n, unit)}" for run, n in columns) + " |")
    lines.append("|---" * (len(columns) + 1) + "|")
    by_case = [{r["case"]: r for r in run.rows} for run in runs]
    cases = list(dict.fromkeys(r["case"] for run in runs for r in run.rows))
    for case in cases:
        cells = [
            _format_value(n, table[case][n]) if case in table else "-"
            for table, (run, n) in zip([t for t in by_case for _ in METRIC_NAMES], columns)
        ]
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    units = {run.distance_unit for run in runs}
    note = f"Distances in {unit} units." if len(units) == 1 else f"Warning: runs differ in distance units {units}."
    lines += ["", f"{note} Std is the population std (ddof=0). Source: `<eval_dir>/{METRICS_CSV}` of each run.", ""]
    return "\n".join(lines)


def _metrics_csv(runs: list[_Run]) -> str:
    """Long table ``run, case, dice, jaccard, hd95, asd``; after each run's cases, rows ``mean`` and ``std``."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["run", "case", *METRIC_NAMES])
    for run in runs:
        for row in run.rows:
            writer.writerow([run.name, row["case"], *(row[n] for n in METRIC_NAMES)])
        for stat in ("mean", "std"):
            writer.writerow([run.name, stat, *(run.stats[n][stat] for n in METRIC_NAMES)])
    return buffer.getvalue()


def _save_figure(fig: Any, path: Path) -> None:
    """``fig.savefig(path)`` as PNG, atomically."""
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def _tag_group(tag: str) -> int:
    """Panel order: losses, ramp, learning rates, validation metrics, anything else."""
    for group, test in enumerate(
        (lambda t: t.startswith("loss"), lambda t: t == "ramp", lambda t: t.startswith("lr"), lambda t: "val" in t)
    ):
        if test(tag):
            return group
    return 4


def _ema(values: np.ndarray, weight: float) -> np.ndarray:
    """TensorBoard-style exponential moving average (debiased)."""
    out, last = np.empty_like(values), 0.0
    for i, v in enumerate(values):
        last = last * weight + (1.0 - weight) * v
        out[i] = last / (1.0 - weight ** (i + 1))
    return out


def _plot_curves(runs: list[_Run], path: Path, smoothing: float) -> list[str]:
    """``curves.png``: one panel per scalar tag (union over runs), one line per run. Returns the tags plotted."""
    tags = list(dict.fromkeys(t for run in runs for t in run.scalars))
    tags.sort(key=_tag_group)  # stable: within a group, the order in which training logged the tags
    ncols = min(4, len(tags))
    nrows = math.ceil(len(tags) / ncols)
    fig = Figure(figsize=(4.0 * ncols, 3.0 * nrows), layout="constrained")
    colors = [f"C{i}" for i in range(len(runs))]
    for i, tag in enumerate(tags):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        for run, color in zip(runs, colors):
            if tag not in run.scalars:
                continue
            steps, values = run.scalars[tag]
            if len(values) > 20 and smoothing > 0:
                ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
                ax.plot(steps, _ema(values, smoothing), color=color, linewidth=1.4, label=run.name)
            else:
                ax.plot(steps, values, color=color, marker="o", markersize=3, linewidth=1.2, label=run.name)
        ax.set_title(tag, fontsize=10)
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if len(runs) > 1:
            ax.legend(fontsize=7)
    fig.suptitle("Training curves" + (f" (EMA smoothing {smoothing}, raw faint)" if smoothing > 0 else ""))
    _save_figure(fig, path)
    return tags


def _largest_error_slices(label: np.ndarray, pred: np.ndarray) -> list[int] | None:
    """``[x, y, z]``: along each axis of (X, Y, Z) masks, the slice with the most false positive + false negative
    voxels (the first such slice on a tie); None when ``pred`` equals ``label``."""
    error = np.logical_xor(label, pred)
    if not error.any():
        return None
    return [int(np.argmax(error.sum(axis=tuple(a for a in range(3) if a != axis)))) for axis in range(3)]


def _views(volume: np.ndarray, centre: Sequence[int]) -> list[np.ndarray]:
    """Axial, coronal, sagittal 2D slices of an (X, Y, Z) volume, transposed for ``imshow(origin="lower")``."""
    x, y, z = centre
    return [volume[:, :, z].T, volume[:, y, :].T, volume[x, :, :].T]


def _overlay_inputs(runs: list[_Run], case: str) -> tuple[dict[str, str], list[tuple[_Run, str]]]:
    """Check the files of one case's overlay: ``({"image", "label"} paths, [(run, prediction path), ...])``."""
    cases_json = runs[0].eval_dir / CASES_JSON
    entry = runs[0].cases.get(case)
    if entry is None:
        raise ValueError(f"{cases_json} has no entry for case {case!r}")
    for key in ("image", "label"):
        if not entry.get(key):
            raise ValueError(f"{cases_json}: case {case!r} has no {key} path")
        _need(Path(entry[key]), f"{key} of case {case!r} listed in {cases_json}")
    predictions = []
    for run in runs:
        if case not in run.cases:
            continue
        pred_path = run.cases[case].get("prediction")
        if not pred_path:
            raise ValueError(
                f"{run.eval_dir / CASES_JSON}: case {case!r} has no prediction path (evaluate with save_predictions)"
            )
        _need(Path(pred_path), f"prediction of case {case!r} listed in {run.eval_dir / CASES_JSON}")
        predictions.append((run, pred_path))
    return {"image": entry["image"], "label": entry["label"]}, predictions


def _plot_overlay(
    sources: dict[str, str],
    predictions: list[tuple[_Run, str]],
    case: str,
    title: str,
    path: Path,
    at_error: bool = False,
) -> list[int]:
    """Orthogonal slices with GT and predicted contours, one row per run.

    The slices go through the label's centre of mass, or with ``at_error`` through the largest error of the first
    run's prediction (:func:`_largest_error_slices`; the centre when it has none).

    Returns:
        The ``[x, y, z]`` indices of the sagittal, coronal and axial slices shown.
    """
    data = LoadH5d(("image", "label"))(sources)
    image, label = data["image"][0].numpy(), data["label"][0].numpy() > 0
    spacing = [float(s) for s in data["image"].pixdim]
    preds = []
    for _, pred_path in predictions:
        pred = LoadH5d("pred")({"pred": pred_path})["pred"][0].numpy() > 0
        if pred.shape != label.shape:
            raise ValueError(f"{pred_path}: shape {pred.shape} differs from the label's {label.shape}")
        preds.append(pred)
    centre = [int(round(c)) for c in center_of_mass(label)] if label.any() else [s // 2 for s in label.shape]
    worst = _largest_error_slices(label, preds[0]) if at_error and preds else None
    centre = worst or centre
    lo, hi = np.percentile(image, (1, 99))
    # (horizontal, vertical) voxel spacing of each view, for the pixel aspect ratio
    view_spacing = [(spacing[0], spacing[1]), (spacing[0], spacing[2]), (spacing[1], spacing[2])]
    where = " (largest error)" if worst else ""
    view_names = [f"axial z={centre[2]}{where}", f"coronal y={centre[1]}{where}", f"sagittal x={centre[0]}{where}"]
    fig = Figure(figsize=(12.0, 4.0 * len(predictions) + 0.8), layout="constrained")
    axes = fig.subplots(len(predictions), 3, squeeze=False)
    for r, ((run, _), pred) in enumerate(zip(predictions, preds)):
        dice = next(row["dice"] for row in run.rows if row["case"] == case)
        for c, views in enumerate(zip(_views(image, centre), _views(label, centre), _views(pred, centre))):
            img2d, gt2d, pred2d = views
            ax = axes[r, c]
            aspect = view_spacing[c][1] / view_spacing[c][0]
            ax.imshow(img2d, cmap="gray", vmin=lo, vmax=hi, origin="lower", aspect=aspect)
            for mask, color in ((gt2d, _GT_COLOR), (pred2d, _PRED_COLOR)):
                if mask.any() and not mask.all():
                    ax.contour(mask.astype(np.float32), levels=[0.5], colors=color, linewidths=1.2)
            label_c = f"{run.name}, Dice {100 * dice:.2f}%: {view_names[c]}" if c == 0 else view_names[c]
            ax.set_title(label_c, fontsize=10)
            ax.set_axis_off()
    handles = [Line2D([], [], color=c, label=n) for c, n in ((_GT_COLOR, "ground truth"), (_PRED_COLOR, "prediction"))]
    fig.legend(handles=handles, loc="outside lower center", ncols=2)
    fig.suptitle(f"{title}: {case}")
    _save_figure(fig, path)
    return centre


def report(
    run_dir: Optional[PathLike] = None,
    eval_dir: Optional[PathLike] = None,
    output_dir: Optional[PathLike] = None,
    runs: Optional[Mapping[str, RunSpec]] = None,
    smoothing: float = 0.6,
) -> dict[str, Any]:
    """Write the metric tables, learning curves and best / worst overlays of one or several runs.

    Args:
        run_dir: training output directory holding TensorBoard event files (curves). Single-run form.
        eval_dir: evaluation output directory holding ``metrics.csv``, ``cases.json`` (and
            ``metrics_summary.json``) and the predictions (tables, overlays). Single-run form; without it only
            ``curves.png`` is written.
        output_dir: where the report goes; default ``<run_dir>/report`` (``<eval_dir>/report`` without run_dir;
            with ``runs``, the first run's).
        runs: several runs side by side instead of ``run_dir`` / ``eval_dir``: ``{name: (run_dir, eval_dir)}``
            (either may be None) or ``{name: {"run_dir": .., "eval_dir": ..}}``, in display order. The first run
            with an evaluation picks the best / worst case.
        smoothing: TensorBoard-style EMA weight of curves with more than 20 points (0: raw only).

    Returns:
        ``{"output_dir", "files": {name: path}, "curve_tags": [tags plotted, panel order], "best_case",
        "worst_case", "overlay_slices": {"best" / "worst": [x, y, z] of the slices shown}, "summary": {run:
        {metric: {"mean", "std"}}}}`` (case / slice / summary entries are None / empty without an evaluation).

    Raises:
        FileNotFoundError: a given directory, its event files, ``metrics.csv``, ``cases.json``, an image, label or
            prediction listed in ``cases.json`` is missing (the message names it).
        ValueError: inconsistent arguments or inputs.
    """
    if runs is not None:
        if run_dir is not None or eval_dir is not None:
            raise ValueError("give either runs or run_dir / eval_dir, not both")
        if not runs:
            raise ValueError("runs is empty")
        run_list = [_as_run(str(name), spec) for name, spec in runs.items()]
    else:
        if run_dir is None and eval_dir is None:
            raise ValueError("report needs run_dir (training output), eval_dir (evaluation output) or runs")
        name = Path(run_dir if run_dir is not None else eval_dir).resolve().name
        run_list = [_as_run(name, (run_dir, eval_dir))]

    for run in run_list:  # read and check everything before writing
        if run.run_dir is not None:
            run.scalars = load_scalars(run.run_dir)
        if run.eval_dir is not None:
            _read_eval(run)
    evaluated = [run for run in run_list if run.eval_dir is not None]
    best = worst = None
    overlays = {}
    if evaluated:
        dices = [row["dice"] for row in evaluated[0].rows]
        best = evaluated[0].rows[int(np.argmax(dices))]["case"]
        worst = evaluated[0].rows[int(np.argmin(dices))]["case"]
        overlays = {"best": _overlay_inputs(evaluated, best), "worst": _overlay_inputs(evaluated, worst)}

    first = run_list[0]
    out = Path(output_dir) if output_dir is not None else (first.run_dir or first.eval_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    slices: dict[str, list[int]] = {}
    tags: list[str] = []
    if any(run.scalars for run in run_list):
        tags = _plot_curves([run for run in run_list if run.scalars], out / "curves.png", smoothing)
        files["curves"] = str(out / "curves.png")
    if evaluated:
        write_text(out / "metrics.md", _metrics_markdown(evaluated))
        write_text(out / "metrics.csv", _metrics_csv(evaluated))
        files["metrics_md"], files["metrics_csv"] = str(out / "metrics.md"), str(out / "metrics.csv")
        for kind, case in (("best", best), ("worst", worst)):
            title = f"{kind.capitalize()} case by Dice of {evaluated[0].name}"
            slices[kind] = _plot_overlay(*overlays[kind], case, title, out / f"overlay_{kind}.png", kind == "worst")
            files[f"overlay_{kind}"] = str(out / f"overlay_{kind}.png")
    return {
        "output_dir": str(out),
        "files": files,
        "curve_tags": tags,
        "best_case": best,
        "worst_case": worst,
        "overlay_slices": slices,
        "summary": {run.name: run.stats for run in evaluated},
    }
