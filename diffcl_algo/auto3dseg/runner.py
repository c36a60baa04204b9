"""What the ``diffcl`` template's scripts run: fold split, training, validation, inference (``InferClass``).

* :func:`fold_split`: one Auto3DSeg fold of a semi-supervised datalist: validation = labeled ``training`` entries
  whose ``fold`` is the algo's fold; training = every other labeled entry (labeled loader) and every entry without
  ``label``, whatever its fold (unlabeled loader).
* :func:`train` (``scripts/train.py run``): writes that split as ``<ckpt_path>/datalist.json`` and runs
  ``diffcl_algo.training.train`` (the package's graph ``diffcl_algo/configs/train.yaml``, the one every bundle is
  written from) with the config's values as overrides, then
  writes ``<ckpt_path>/progress.yaml``, whose last entry's ``best_avg_dice_score`` (the best validation mean Dice
  of the run, as ``model.pt``) is what ``BundleAlgo.get_score`` reads.
* :func:`validate` (``scripts/validate.py run``): ``model.pt`` on the fold's validation cases
  (``diffcl_algo.evaluation.evaluate``).
* :class:`InferClass` (``scripts/infer.py``, ``BundleAlgo.predict``, the AutoRunner ensemble): CS-only
  sliding-window prediction (``diffcl_algo.inference.predict_volume``) of one image.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.distributed as dist
import yaml
from monai.config import PathLike
from monai.data import MetaTensor, load_decathlon_datalist
from monai.transforms import Compose
from torch import nn

from diffcl_algo.auto3dseg.config import TEMPLATE_KEYS, load_config
from diffcl_algo.data import DataError, decathlon_datalists, val_transforms
from diffcl_algo.data.writers import write_text
from diffcl_algo.evaluation import CaseNamed, eval_postprocessing, evaluate
from diffcl_algo.inference import predict_volume
from diffcl_algo.training import load_bundle
from diffcl_algo.training import train as run_training

__all__ = [
    "PROGRESS_FILE",
    "fold_split",
    "training_arguments",
    "trained_config",
    "train",
    "cs_network",
    "validate",
    "InferClass",
]

PROGRESS_FILE = "progress.yaml"
"""Written in ``ckpt_path``; ``BundleAlgo.get_score`` returns its last entry's ``best_avg_dice_score``."""

TRAINING_RECORD = "training_arguments.yaml"
"""Written in ``ckpt_path``: the graph overrides of the run (config and ``train_params`` overrides)."""

NETWORK_KEYS = (
    "in_channels",
    "num_classes",
    "n_filters",
    "norm",
    "use_hfm",
    "hfm_stages",
    "hf",
    "dataset_name",
    "num_labeled",
)
"""Config values that define the CS network (``network_def`` of the package's graph)."""

RECORDED_KEYS = (*NETWORK_KEYS, "patch_size", "strides")
"""What validation and inference take from the training record unless overridden."""

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
    """The graph overrides of ``diffcl_algo.training.build_trainer``: the config without its template keys.

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


def _is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def train(config_file: ConfigFiles, **override: Any) -> dict[str, Any]:
    """Train one fold (``scripts/train.py run --config_file <configs> [--key value ...]``).

    Returns:
        The summary of ``diffcl_algo.training.train`` (``best_metric``, ``model_path``, ...).
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
    if _is_main():
        progress = {
            "best_avg_dice_score": float(summary["best_metric"]),
            "best_iteration": int(summary["best_iteration"]),
            "iteration": int(summary["iteration"]),
            "fold": int(config["fold"]),
            "model_path": summary["model_path"],
        }
        write_text(out / PROGRESS_FILE, yaml.safe_dump([progress], sort_keys=False))
    return summary


def cs_network(config: Mapping[str, Any]) -> nn.Module:
    """The CS network of the config: ``network_def`` of the package's graph with the config's network values."""
    graph = load_bundle(None, "inference", **{k: config[k] for k in NETWORK_KEYS if k in config})
    return graph.get_parsed_content("network_def")


def _device(name: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def trained_config(config: Mapping[str, Any], override: Mapping[str, Any] = ()) -> dict[str, Any]:
    """``config`` with the network, patch and stride values the run used (``<ckpt_path>/training_arguments.yaml``,
    which holds the training overrides too), except those in ``override``."""
    path = Path(config["ckpt_path"]) / TRAINING_RECORD
    record = yaml.safe_load(path.read_text()) if path.is_file() else {}
    keys = set(RECORDED_KEYS) - set(override)
    return {**config, **{k: v for k, v in record.items() if k in keys}}


def _trained_network(config: Mapping[str, Any], device: torch.device) -> nn.Module:
    """``cs_network`` with ``<ckpt_path>/model.pt``, on ``device``, in eval mode."""
    net = cs_network(config)
    path = Path(config["ckpt_path"]) / "model.pt"
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return net.to(device).eval()


def validate(config_file: ConfigFiles, **override: Any) -> dict[str, Any]:
    """``model.pt`` on the fold's validation cases (``scripts/validate.py run``); predictions and metrics go to
    ``validate#output_path``.

    Returns:
        ``diffcl_algo.evaluation.evaluate``'s summary (mean Dice, Jaccard, 95HD, ASD).
    """
    config = trained_config(load_config(config_file, override), override)
    _, validation = fold_split(config["data_list_file_path"], config["data_file_base_dir"], config["fold"])
    device = _device(str(config["device"]))
    net = _trained_network(config, device)
    out = config["validate"]["output_path"]
    return evaluate(net, validation, out, config["patch_size"], config["strides"], device=device)


class InferClass:
    """CS-only sliding-window inference of a trained fold (the class ``BundleAlgo.get_inferer`` loads).

    Args:
        config_file: the algo's configs.
        override: config overrides (``BundleAlgo.predict(predict_params=...)``); ids the configs do not have are
            ignored (the AutoRunner ensemble passes its own).
    """

    def __init__(self, config_file: ConfigFiles, **override: Any) -> None:
        config = trained_config(load_config(config_file, override, known_only=True), override)
        self.device = _device(str(config["device"]))
        self.network = _trained_network(config, self.device)
        self.patch_size, self.strides = config["patch_size"], config["strides"]
        self.sw_batch_size = int(config["sw_batch_size"])
        self.save_mask = bool(config["infer"]["save_mask"])
        self.output_path = config["infer"]["output_path"]
        self.preprocessing = Compose([val_transforms(labeled=False), CaseNamed("image")])
        self.postprocessing = eval_postprocessing(self.output_path)
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
                (C, *S) (what the AutoRunner ensemble averages). True: write ``<infer#output_path>/<case>.nii.gz``
                and return the label map (1, *S).

        Returns:
            A MetaTensor with the image's affine and metadata (``saved_to`` when written).
        """
        data = dict(image_file) if isinstance(image_file, Mapping) else {"image": str(image_file)}
        data = self.preprocessing({k: v for k, v in data.items() if k != "label"})
        image = data["image"]
        probs = predict_volume(self.network, image, self.patch_size, self.strides, self.sw_batch_size, self.device)
        pred = MetaTensor(probs[0].cpu(), meta=image.meta)
        if not (self.save_mask if save_mask is None else save_mask):
            return pred
        return self.postprocessing({"pred": pred})["pred"]

    def infer_all(self) -> list[str]:
        """Write the label map of every ``infer#data_list_key`` image; returns the written paths."""
        return [str(self.infer(f, save_mask=True).meta["saved_to"]) for f in self.infer_files]
