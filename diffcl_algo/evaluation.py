"""Test-set evaluation: CS sliding-window predictions saved as NIfTI, per-case medpy-equal metrics, summaries.

The pieces are MONAI/ignite components so the same graph runs from a bundle config and from Python:

- preprocessing :func:`eval_preprocessing` = :func:`~diffcl_algo.data.val_transforms` (whole volumes) followed by
  :class:`CaseNamed`, which puts the case name (the datalist's ``"case"``, else derived from the path by
  :func:`case_name`) into the image's metadata;
- inference: :class:`~diffcl_algo.inference.DiffCLSlidingWindowInferer` (the paper's patch and strides, averaged
  softmax), CS network only;
- postprocessing :func:`eval_postprocessing` = ``AsDiscreted(argmax)`` then ``SaveImaged`` writing exactly
  ``<output_dir>/<case>.nii.gz`` (uint8 label map, the image's shape and affine), named by
  :func:`case_name_formatter` (the field's LA files are all called ``mri_norm2.h5``: the case is the folder);
- :class:`CaseMetricsWriter` (ignite handler): Dice / Jaccard / 95HD / ASD per case
  (:func:`~diffcl_algo.metrics.case_metrics` via :class:`~diffcl_algo.metrics.MedpyMetric`) and, when the run
  completes, ``metrics.csv``, ``metrics_summary.json`` and ``cases.json``, each written atomically.

:func:`build_evaluator` assembles them into a ``monai.engines.SupervisedEvaluator``; :func:`evaluate` builds and runs
it for an in-memory network (Auto3DSeg's validation). The bundles' evaluation workflow wires the same pieces in
``diffcl_algo/configs/evaluate.yaml``, an override of the training graph's ``validate`` section::

    validate#preprocessing: $eval_preprocessing(@spacing)
    validate#dataset#data: '@data#cases'                 # eval_list, or the LA hold-out cases
    validate#postprocessing: $eval_postprocessing(@output_dir)
    validate#handlers:
    - {_target_: CheckpointLoader, load_path: '@ckpt_path', load_dict: {model: '@network'}, map_location: '@device'}
    - {_target_: diffcl_algo.evaluation.CaseMetricsWriter, output_dir: '@output_dir', use_spacing: ...}
    - {_target_: StatsHandler, name: diffcl_algo.evaluate, iteration_log: false}
    validate#evaluator#key_val_metric: null
    evaluating: [..., $@data#check, $@validate#evaluator.run()]

(``CheckpointLoader`` with a single ``load_dict`` entry accepts the bare ``state_dict`` of ``model.pt``.)
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence, Union

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.config import KeysCollection, PathLike
from monai.data import DataLoader, Dataset, MetaTensor, decollate_batch
from monai.engines import SupervisedEvaluator
from monai.transforms import AsDiscreted, Compose, MapTransform, SaveImaged
from monai.utils import ImageMetaKey
from monai.utils.enums import MetaKeys
from torch import nn

from diffcl_algo.data import LAYOUTS, val_transforms
from diffcl_algo.data.writers import write_text
from diffcl_algo.inference import DiffCLSlidingWindowInferer
from diffcl_algo.metrics import (
    BOTH_EMPTY_VALUES,
    METRIC_NAMES,
    ONE_EMPTY_DISTANCE,
    ONE_EMPTY_OVERLAP,
    MedpyMetric,
    summarize,
)

__all__ = [
    "CASES_JSON",
    "CASE_META_KEY",
    "CaseMetricsWriter",
    "CaseNamed",
    "EMPTY_CASE_NOTE",
    "METRICS_CSV",
    "SUMMARY_JSON",
    "build_evaluator",
    "case_name",
    "case_name_formatter",
    "eval_postprocessing",
    "eval_preprocessing",
    "evaluate",
    "save_prediction",
]

#: Metadata key holding the case name (set by :class:`CaseNamed`, read by :func:`case_name_formatter`).
CASE_META_KEY = "case"
#: File names of the evaluation outputs (in ``output_dir``).
METRICS_CSV, SUMMARY_JSON, CASES_JSON = "metrics.csv", "metrics_summary.json", "cases.json"
#: How empty masks are scored (see :func:`diffcl_algo.metrics.case_metrics`); copied into ``metrics_summary.json``.
EMPTY_CASE_NOTE = (
    f"no NaN: prediction and label both empty -> {dict(BOTH_EMPTY_VALUES)}; exactly one empty -> "
    f"dice = jaccard = {ONE_EMPTY_OVERLAP}, hd95 = asd = {ONE_EMPTY_DISTANCE} (the diagonal of the volume's "
    "extent, worse than any non-empty prediction); see diffcl_algo.metrics.case_metrics"
)
_PREDICTION_EXT = ".nii.gz"


def _layout_regexes() -> list[re.Pattern]:
    """One regex per ``LAYOUTS`` pattern capturing ``{case}`` from the end of a POSIX path."""
    out = []
    for pattern in LAYOUTS.values():
        head, tail = pattern.split("{case}")
        out.append(re.compile(f"(?:^|/){re.escape(head)}([^/]+){re.escape(tail)}$"))
    return out


_LAYOUT_REGEXES = _layout_regexes()
# file names shared by every case of a layout (LA: mri_norm2.h5): the case is the parent folder
_SHARED_FILE_NAMES = {Path(p).name for p in LAYOUTS.values() if "{case}" not in Path(p).name}


def case_name(path: PathLike) -> str:
    """Case name of an image path.

    Rules, first match wins: the ``{case}`` part of a known layout (``LAYOUTS``: LA
    ``.../2018LA_Seg_Training Set/<case>/mri_norm2.h5``, BraTS ``.../data/<case>.h5``, Pancreas
    ``.../Pancreas_h5/<case>_norm.h5``); the parent folder for a file name that every case of a layout shares
    (``mri_norm2.h5``); else the file name without its extension (``.nii.gz`` counts as one).

    Args:
        path: image file path.
    """
    posix = Path(path).as_posix()
    for regex in _LAYOUT_REGEXES:
        match = regex.search(posix)
        if match:
            return match.group(1)
    p = Path(posix)
    if p.name in _SHARED_FILE_NAMES and p.parent.name:
        return p.parent.name
    name = p.name[: -len(".gz")] if p.name.endswith(".gz") else p.name
    return name.rsplit(".", 1)[0] if "." in name else name


class CaseNamed(MapTransform):
    """Set ``data[case_key]`` and the case name in the metadata of ``keys`` (loaded MetaTensors).

    The name is ``data[case_key]`` when the datalist provides it (:func:`~diffcl_algo.data.build_datalists`
    does), else :func:`case_name` of the first key's file (``filename_or_obj`` metadata, or the path itself when
    not loaded yet). The metadata entry :data:`CASE_META_KEY` travels with the image through sliding-window
    inference into the prediction, where :func:`case_name_formatter` reads it.

    Args:
        keys: keys whose MetaTensor metadata receive the case name (the image; its metadata is copied to ``pred``).
        case_key: datalist key of the case name.
        allow_missing_keys: do not raise when a key is absent.
    """

    def __init__(self, keys: KeysCollection = "image", case_key: str = "case", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.case_key = case_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Return a copy of ``data`` with ``case_key`` set and the name stored in each key's metadata."""
        d = dict(data)
        keys = list(self.key_iterator(d))
        if self.case_key not in d:
            if not keys:
                raise KeyError(f"CaseNamed: no '{self.case_key}' entry and none of {self.keys} to derive it from.")
            first = d[keys[0]]
            path = first.meta.get(ImageMetaKey.FILENAME_OR_OBJ) if isinstance(first, MetaTensor) else first
            if not isinstance(path, (str, Path)):
                raise ValueError(f"CaseNamed: cannot derive a case name from {type(first).__name__} '{keys[0]}'.")
            d[self.case_key] = case_name(path)
        for key in keys:
            if isinstance(d[key], MetaTensor):
                d[key].meta[CASE_META_KEY] = str(d[self.case_key])
        return d


def case_name_formatter(metadict: Mapping[str, Any] | None, saver: Any = None) -> dict[str, Any]:
    """``SaveImage(d)`` ``output_name_formatter`` naming the file after the case (no patch index).

    The case is ``metadict[CASE_META_KEY]`` (set by :class:`CaseNamed`), else :func:`case_name` of
    ``filename_or_obj``. With ``output_postfix=""`` and ``separate_folder=False`` the file is
    ``<output_dir>/<case><output_ext>``; the returned ``subject`` carries a dummy extension so that MONAI's
    extension stripping keeps case names containing dots intact.

    Args:
        metadict: metadata of the tensor being saved.
        saver: the ``SaveImage`` instance (unused; part of MONAI's formatter signature).
    """
    metadict = metadict or {}
    case = metadict.get(CASE_META_KEY)
    if case is None:
        source = metadict.get(ImageMetaKey.FILENAME_OR_OBJ)
        if source is None:
            raise ValueError(
                f"case_name_formatter: the metadata has neither '{CASE_META_KEY}' nor 'filename_or_obj'."
            )
        case = case_name(source)
    return {"subject": f"{case}{_PREDICTION_EXT}", "idx": None}


def eval_preprocessing(
    spacing: float | Sequence[float] | None = None,
    case_key: str = "case",
    normalize: bool = False,
    scan_norm: str = "zscore",
) -> Compose:
    """Whole-volume loading (:func:`~diffcl_algo.data.val_transforms`) followed by :class:`CaseNamed`.

    Args:
        spacing: voxel size given to the h5 reader (None: the file's attribute, else the LA spacing).
        case_key: datalist key of the case name.
        normalize: z-score each image volume, as the model's training did (``normalize_intensity``).
        scan_norm: normalisation of raw (non-h5) scans (:class:`~diffcl_algo.data.intensity.ScanNormalized`).

    Returns:
        ``Compose`` mapping ``{"image": path, "label": path[, "case": name]}`` to float32 MetaTensors (1, *S)
        plus ``"case"``.
    """
    chain = val_transforms(spacing=spacing, normalize=normalize, scan_norm=scan_norm)
    return Compose([chain, CaseNamed("image", case_key=case_key)])


def eval_postprocessing(output_dir: PathLike, save_predictions: bool = True) -> Compose:
    """Argmax of ``pred``, then (if ``save_predictions``) ``SaveImaged`` as ``<output_dir>/<case>.nii.gz``.

    The saved prediction is a uint8 label map with the image's spatial shape and affine (no resampling); its
    path is recorded in the prediction's metadata (``saved_to``) for ``cases.json``.

    Args:
        output_dir: where predictions go.
        save_predictions: write the NIfTI predictions.
    """
    transforms: list = [AsDiscreted(keys="pred", argmax=True)]
    if save_predictions:
        transforms.append(save_prediction(output_dir))
    return Compose(transforms)


def save_prediction(output_dir: PathLike, key: str = "pred") -> SaveImaged:
    """``SaveImaged`` writing ``data[key]`` as ``<output_dir>/<case>.nii.gz``: a uint8 label map on the tensor's own
    grid and affine (no resampling), its path recorded in the metadata (``saved_to``)."""
    return SaveImaged(
        keys=key,
        output_dir=str(output_dir),
        output_postfix="",
        output_ext=_PREDICTION_EXT,
        output_dtype=np.uint8,
        resample=False,
        separate_folder=False,
        print_log=False,
        output_name_formatter=case_name_formatter,
        savepath_in_metadict=True,
    )


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
    return not bool((x[1] > 0.5 if x.shape[0] == 2 else x[0] > 0).any())


class CaseMetricsWriter:
    """Ignite handler: per-case Dice / Jaccard / 95HD / ASD of an evaluation run, written to ``output_dir``.

    Every iteration, each case of the (decollated) engine output is scored with
    :func:`~diffcl_algo.metrics.case_metrics` (through :class:`~diffcl_algo.metrics.MedpyMetric`): ``pred`` and
    ``label`` are channel-first tensors, either label maps (1, *S) (foreground ``> 0``) or binarised one-hot
    maps (2, *S). The case name is, in this order, ``case_key`` of the output or batch item, the
    prediction's :data:`CASE_META_KEY` metadata, or :func:`case_name` of the image path; a name seen twice raises.

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
        for source in (out, batch_item):
            if source.get(self.case_key) is not None:
                return str(source[self.case_key])
        pred = out[self.pred_key]
        if isinstance(pred, MetaTensor) and pred.meta.get(CASE_META_KEY) is not None:
            return str(pred.meta[CASE_META_KEY])
        path = _path(out.get(self.image_key)) or _path(pred)
        if path is None:
            raise ValueError(f"CaseMetricsWriter: no '{self.case_key}' key and no image path to name the case.")
        return case_name(path)

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


def build_evaluator(
    network: nn.Module,
    datalist: Sequence[Mapping[str, Any]],
    output_dir: PathLike,
    patch_size: Sequence[int],
    strides: Union[Sequence[int], int],
    device: Union[str, torch.device] = "cpu",
    sw_batch_size: int = 1,
    use_spacing: bool = False,
    spacing: float | Sequence[float] | None = None,
    save_predictions: bool = True,
    num_workers: int = 0,
    handlers: Sequence[Any] = (),
    amp: bool = False,
) -> SupervisedEvaluator:
    """``SupervisedEvaluator`` running the CS network over ``datalist`` with :class:`CaseMetricsWriter` attached.

    Args:
        network: the CS network, ``network(x: (B, 1, *patch)) -> logits (B, num_classes, *patch)``; moved to
            ``device``.
        datalist: ``[{"image": path, "label": path[, "case": name]}, ...]`` (h5 or NIfTI; e.g. the first output
            of :func:`~diffcl_algo.data.build_datalists` for the test list).
        output_dir: predictions ``<case>.nii.gz`` and ``metrics.csv`` / ``metrics_summary.json`` / ``cases.json``.
        patch_size, strides: sliding-window patch and stride (LA 112x112x80 / 18x18x4, Pancreas 96^3 / 16^3,
            BraTS 96^3 / 64^3).
        device: where inference runs.
        sw_batch_size: windows per forward pass.
        use_spacing: hd95/asd in physical units (see :class:`CaseMetricsWriter`); default voxel units.
        spacing: voxel size for h5 files (see :class:`~diffcl_algo.data.LoadH5d`).
        save_predictions: write the NIfTI predictions.
        num_workers: data-loader workers.
        handlers: extra handlers attached after the metrics writer (e.g. ``monai.handlers.CheckpointLoader``
            restoring ``model.pt``, ``StatsHandler``).
        amp: autocast during inference.

    Returns:
        The evaluator; ``evaluator.run()`` evaluates, after which ``evaluator.state.metrics`` holds the means.
    """
    if not datalist:
        raise ValueError("build_evaluator: the datalist is empty.")
    loader = DataLoader(
        Dataset(data=list(datalist), transform=eval_preprocessing(spacing)), batch_size=1, num_workers=num_workers
    )
    return SupervisedEvaluator(
        device=torch.device(device),
        val_data_loader=loader,
        network=network.to(device),
        inferer=DiffCLSlidingWindowInferer(patch_size, strides, sw_batch_size=sw_batch_size),
        postprocessing=eval_postprocessing(output_dir, save_predictions),
        val_handlers=[CaseMetricsWriter(output_dir, use_spacing=use_spacing), *handlers],
        amp=amp,
    )


def evaluate(
    net: nn.Module,
    datalist: Sequence[Mapping[str, Any]],
    output_dir: PathLike,
    patch_size: Sequence[int],
    strides: Union[Sequence[int], int],
    **options: Any,
) -> dict[str, Any]:
    """Evaluate an in-memory CS network on ``datalist`` (the bundle's ``evaluating`` workflow without YAML).

    Arguments and keyword ``options`` as in :func:`build_evaluator`.

    Returns:
        The ``metrics_summary.json`` content plus ``"output_dir"``.
    """
    build_evaluator(net, datalist, output_dir, patch_size, strides, **options).run()
    summary = json.loads((Path(output_dir) / SUMMARY_JSON).read_text())
    return {**summary, "output_dir": str(output_dir)}
