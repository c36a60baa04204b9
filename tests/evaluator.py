"""Test helper: an in-memory network scored by the evaluation chains of the bundles' ``evaluate`` workflow.

The bundles evaluate a trained ``model.pt`` with the graph (``python -m monai.bundle run evaluating``); handler and
metric tests need networks that are no graph network (a threshold, an all-background net), so this wires the same
pieces (:mod:`diffcl_algo.inference.chains`, the sliding-window inferer, ``CaseMetricsWriter``) around one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedEvaluator
from torch import nn

from diffcl_algo.evaluation.handlers import SUMMARY_JSON, CaseMetricsWriter
from diffcl_algo.inference.chains import eval_postprocessing, eval_preprocessing
from diffcl_algo.inference.inferer import DiffCLSlidingWindowInferer


def evaluate(
    net: nn.Module,
    datalist: Sequence[Mapping[str, Any]],
    output_dir: str | Path,
    patch_size: Sequence[int],
    strides: Sequence[int] | int,
    use_spacing: bool = False,
    save_predictions: bool = True,
) -> dict[str, Any]:
    """Run ``net`` over ``datalist`` like the evaluate workflow; returns ``metrics_summary.json`` + ``output_dir``."""
    loader = DataLoader(Dataset(data=list(datalist), transform=eval_preprocessing()), batch_size=1)
    SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=loader,
        network=net,
        inferer=DiffCLSlidingWindowInferer(patch_size, strides),
        postprocessing=eval_postprocessing(output_dir, save_predictions),
        val_handlers=[CaseMetricsWriter(output_dir, use_spacing=use_spacing)],
    ).run()
    return {**json.loads((Path(output_dir) / SUMMARY_JSON).read_text()), "output_dir": str(output_dir)}
