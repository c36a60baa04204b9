"""What the ``diffcl`` template's scripts run: fold split, training, validation, inference (``InferClass``).

* :func:`fold_split`: one Auto3DSeg fold of a semi-supervised datalist: validation = labeled ``training`` entries
  whose ``fold`` is the algo's fold; training = every other labeled entry (labeled loader) and every entry without
  ``label``, whatever its fold (unlabeled loader).
* :func:`train` (``scripts/train.py run``): writes that split as ``<ckpt_path>/datalist.json`` and runs
  ``diffcl_algo.bundle.run.train`` (the package's graph ``diffcl_algo/configs/train.yaml``, the one every bundle is
  written from) with the config's values as overrides, then
  writes ``<ckpt_path>/progress.yaml``, whose last entry's ``best_avg_dice_score`` (the best validation mean Dice
  of the run, as ``model.pt``) is what ``BundleAlgo.get_score`` reads.
* :func:`validate` (``scripts/validate.py run``): ``model.pt`` on the fold's validation cases, by the graph's
  ``evaluate`` workflow (the bundles' ``python -m monai.bundle run evaluating``).
* :class:`InferClass` (``scripts/infer.py``, ``BundleAlgo.predict``, the AutoRunner ensemble): CS-only
  sliding-window prediction of one image with the graph's ``inference`` chains (the bundles' ``inferring``).

Validation and inference take the graph's values of the fold's run from ``<ckpt_path>/training_arguments.yaml`` (the
network, patch and stride, the intensity normalisation, ...), so they see the volumes as training did.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import yaml
from monai.config import PathLike
from monai.data import MetaTensor, load_decathlon_datalist

from diffcl_algo.auto3dseg.config import TEMPLATE_KEYS, load_config
from diffcl_algo.bundle.run import load_bundle, run_workflow
from diffcl_algo.bundle.run import train as run_training
from diffcl_algo.data.io import DataError, decathlon_datalists
from diffcl_algo.evaluation.handlers import SUMMARY_JSON
from diffcl_algo.inference.chains import scan_postprocessing
from diffcl_algo.utils import is_main_process, write_text

__all__ = [
    "PROGRESS_FILE",
    "fold_split",
    "training_arguments",
    "trained_values",
    "train",
    "validate",
    "InferClass",
]

PROGRESS_FILE = "progress.yaml"
"""Written in ``ckpt_path``; ``BundleAlgo.get_score`` returns its last entry's ``best_avg_dice_score``."""

TRAINING_RECORD = "training_arguments.yaml"
"""Written in ``ckpt_path``: the graph overrides of the run (config and ``train_params`` overrides)."""

ConfigFiles = Union[PathLike, Sequence[PathLike]]


def fold_split(datalist: PathLike, dataroot: Optional[PathLike], fold: int) -> tuple[list[dict], list[dict]]:
    """``(training, validation)`` of one Auto3DSeg fold of a Decathlon datalist's ``training`` entries.

    Validation: the labeled entries with ``"fold" == fold``. Training: the other labeled entries, then every
    entry without a label (an unlabeled entry of the validation fold cannot be validated; it trains unlabeled).
    Paths are made absolute against ``dataroot``; the ``fold`` key is dropped.

    Raises:
        DataError: the fold has no labeled entry (nothing to validate, no Auto3DSeg score).
    """
    root = None if dataroot is None else str(Path(dataroot).resolve())
    labeled, unlabeled = decathlon_datalists(datalist, root)
    in_fold = [str(e.get("fold")) == str(fold) for e in labeled]
    drop = lambda e: {k: v for k, v in e.items() if k != "fold"}  # noqa: E731
    validation = [drop(e) for e, v in zip(labeled, in_fold) if v]
    training = [drop(e) for e, v in zip(labeled, in_fold) if not v] + [drop(e) for e in unlabeled]
    if not validation:
        raise DataError(f"{datalist}: no labeled 'training' entry has \"fold\": {fold} (fold {fold}'s validation).")
    return training, validation


def training_arguments(config: Mapping[str, Any], training: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The graph overrides of ``diffcl_algo.bundle.run.build_trainer``: the config without its template keys.

    ``num_labeled`` None becomes the number of labeled training cases; ``val_interval`` is clipped to
    ``max_iterations`` so that every run ends with a validated score.

    Raises:
        ValueError: ``val_interval <= 0``, more ``num_labeled`` than labeled cases, no unlabeled case.
    """
    kwargs = {k: v for k, v in config.items() if k not in TEMPLATE_KEYS}
    num_with_label = sum("label" in e for e in training)
    num_labeled = num_with_label if kwargs.get("num_labeled") is None else int(kwargs["num_labeled"])
    if not 0 < num_labeled <= num_with_label:
        raise ValueError(f"num_labeled={num_labeled}: the training split has {num_with_label} labeled cases.")
    if len(training) == num_labeled:
        raise ValueError(
            f"The training split has no unlabeled case (all {num_labeled} keep their label): Diff-CL is "
            "semi-supervised; add 'training' entries without 'label' or set num_labeled lower."
        )
    if int(kwargs.get("val_interval", 0)) <= 0:
        raise ValueError(f"val_interval must be > 0 (Auto3DSeg scores each fold), got {kwargs.get('val_interval')}.")
    if kwargs.get("max_iterations") is not None:
        kwargs["val_interval"] = min(int(kwargs["val_interval"]), int(kwargs["max_iterations"]))
    kwargs["num_labeled"] = num_labeled
    return kwargs


def train(config_file: ConfigFiles, **override: Any) -> dict[str, Any]:
    """Train one fold (``scripts/train.py run --config_file <configs> [--key value ...]``).

    Returns:
        The summary of ``diffcl_algo.bundle.run.train`` (``best_metric``, ``model_path``, ...).
    """
    config = load_config(config_file, override)
    out = Path(config["ckpt_path"])
    training, validation = fold_split(config["data_list_file_path"], config["data_file_base_dir"], config["fold"])
    if int(config["in_channels"]) != 1:
        raise ValueError(f"in_channels={config['in_channels']}: the data pipeline reads single-channel volumes.")
    kwargs = training_arguments(config, training)
    # written by every torchrun rank before torch.distributed starts (same content, atomic replace)
    datalist = out / "datalist.json"
    write_text(datalist, json.dumps({"training": training, "validation": validation}, indent=1))
    record = {**kwargs, "in_channels": int(config["in_channels"]), "fold": int(config["fold"])}
    write_text(out / TRAINING_RECORD, yaml.safe_dump(record, sort_keys=False))
    summary = run_training(None, dataset_dir=None, datalist=str(datalist), output_dir=str(out), **kwargs)
    if summary["best_metric"] is None:
        raise RuntimeError(f"Training of {out} ran no validation: no score.")
    if is_main_process():
        progress = {
            "best_avg_dice_score": float(summary["best_metric"]),
            "best_iteration": int(summary["best_iteration"]),
            "iteration": int(summary["iteration"]),
            "fold": int(config["fold"]),
            "model_path": summary["model_path"],
        }
        write_text(out / PROGRESS_FILE, yaml.safe_dump([progress], sort_keys=False))
    return summary


def trained_values(config: Mapping[str, Any], override: Mapping[str, Any] = ()) -> dict[str, Any]:
    """The graph ids of the fold's run: the config's (without template keys), replaced by what training was given
    (``<ckpt_path>/training_arguments.yaml``: network, patch, stride, normalisation, ...) except the ids in
    ``override``."""
    path = Path(config["ckpt_path"]) / TRAINING_RECORD
    record = yaml.safe_load(path.read_text()) if path.is_file() else {}
    values = {k: v for k, v in config.items() if k not in TEMPLATE_KEYS}
    values.update({k: v for k, v in record.items() if k not in set(override) | set(TEMPLATE_KEYS)})
    return values


def validate(config_file: ConfigFiles, **override: Any) -> dict[str, Any]:
    """``model.pt`` on the fold's validation cases (``scripts/validate.py run``) by the graph's ``evaluate``
    workflow; predictions and metrics go to ``validate#output_path``.

    Returns:
        The evaluation's ``metrics_summary.json`` (mean Dice, Jaccard, 95HD, ASD) plus ``"output_dir"``.
    """
    config = load_config(config_file, override)
    run_dir, out = Path(config["ckpt_path"]), Path(config["validate"]["output_path"])
    _, validation = fold_split(config["data_list_file_path"], config["data_file_base_dir"], config["fold"])
    datalist = out / "datalist.json"
    write_text(datalist, json.dumps({"validation": validation}, indent=1))
    values = {**trained_values(config, override), "dataset_dir": None, "datalist": str(datalist)}
    run_workflow(None, "evaluate", **values, eval_list="validation", ckpt_path=str(run_dir / "model.pt"),
                 output_dir=str(out))
    return {**json.loads((out / SUMMARY_JSON).read_text()), "output_dir": str(out)}


class InferClass:
    """CS-only sliding-window inference of a trained fold (the class ``BundleAlgo.get_inferer`` loads), with the
    graph's ``inference`` chains: ``preprocessing`` (loading, the training's intensity normalisation, orientation),
    ``inferer``, and ``Invertd`` back to the image's grid.

    Args:
        config_file: the algo's configs.
        override: config overrides (``BundleAlgo.predict(predict_params=...)``); ids the configs do not have are
            ignored (the AutoRunner ensemble passes its own).
    """

    def __init__(self, config_file: ConfigFiles, **override: Any) -> None:
        config = load_config(config_file, override, known_only=True)
        self.save_mask = bool(config["infer"]["save_mask"])
        self.output_path = config["infer"]["output_path"]
        # training read the images in their stored voxel order (no reorientation), so inference keeps it too
        values = {"orientation": None, **trained_values(config, override), "dataset_dir": None}
        values["output_dir"] = self.output_path
        graph = load_bundle(None, "inference", **values)
        self.device = graph.get_parsed_content("device")
        self.network = graph.get_parsed_content("network")
        path = Path(config["ckpt_path"]) / "model.pt"
        self.network.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.network.eval()
        self.inferer = graph.get_parsed_content("inferer")
        self.preprocessing = graph.get_parsed_content("preprocessing")
        self.postprocessing = graph.get_parsed_content("postprocessing")
        self.probabilities = scan_postprocessing(self.preprocessing, None, argmax=False)
        try:
            self.infer_files = load_decathlon_datalist(
                config["data_list_file_path"], False, config["infer"]["data_list_key"], config["data_file_base_dir"]
            )
        except ValueError:  # no such key: nothing to infer by default
            self.infer_files = []

    @torch.no_grad()
    def infer(self, image_file: Union[PathLike, Mapping[str, Any]], save_mask: Optional[bool] = None) -> MetaTensor:
        """Segment one image (a path or a datalist entry ``{"image": path}``).

        Args:
            image_file: the image.
            save_mask: None: the config's ``infer#save_mask``. False: return the averaged softmax probabilities
                (C, *S) on the image's grid (what the AutoRunner ensemble averages). True: write
                ``<infer#output_path>/<case>.nii.gz`` and return the label map (1, *S).

        Returns:
            A MetaTensor with the image's affine and metadata (``saved_to`` when written).
        """
        data = dict(image_file) if isinstance(image_file, Mapping) else {"image": str(image_file)}
        item = self.preprocessing({k: v for k, v in data.items() if k != "label"})
        item["pred"] = self.inferer(item["image"][None].to(self.device), self.network)[0].cpu()
        save = self.save_mask if save_mask is None else save_mask
        return (self.postprocessing if save else self.probabilities)(item)["pred"]
    def infer_all(self) -> list[str]:
        """Write the label map of every ``infer#data_list_key`` image; returns the written paths."""
        return [str(self.infer(f, save_mask=True).meta["saved_to"]) for f in self.infer_files]
