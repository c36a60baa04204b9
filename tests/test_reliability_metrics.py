"""Reliability: empty prediction / empty label / both empty get the documented finite values, identical in
``metrics.csv`` and ``metrics_summary.json``: no NaN anywhere, no silent NaN averaging (docs/reliability.md, item 5).
"""

from __future__ import annotations

import csv
import json
import math

import h5py
import numpy as np
import pytest
import torch
from evaluator import evaluate
from torch import nn

from diffcl_algo.evaluation.handlers import METRICS_CSV, SUMMARY_JSON
from diffcl_algo.evaluation.metrics import BOTH_EMPTY_VALUES, METRIC_NAMES, volume_diagonal

SHAPE = (16, 16, 16)


class _Constant(nn.Module):
    """Predicts one class everywhere: (B, 1, *S) -> logits (B, 2, *S)."""

    def __init__(self, foreground: bool) -> None:
        super().__init__()
        self.foreground = foreground

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        high, low = torch.ones_like(x), torch.zeros_like(x)
        return torch.cat([low, high] if self.foreground else [high, low], dim=1)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("empty_cases")
    rng = np.random.default_rng(0)
    entries = []
    for name, has_foreground in (("with_fg", True), ("no_fg", False)):
        label = np.zeros(SHAPE, np.uint8)
        if has_foreground:
            label[4:9, 5:10, 6:12] = 1
        path = root / f"{name}.h5"
        with h5py.File(path, "w") as f:
            f.create_dataset("image", data=rng.standard_normal(SHAPE).astype(np.float32))
            f.create_dataset("label", data=label)
        entries.append({"image": str(path), "label": str(path), "case": name})
    return entries


def _no_nan(text: str):
    def reject(constant):
        raise AssertionError(f"{constant} in metrics_summary.json")

    return json.loads(text, parse_constant=reject)


def _run(net, cases, out):
    summary = evaluate(net, cases, out, SHAPE, 8, save_predictions=False)
    rows = {r["case"]: {m: float(r[m]) for m in METRIC_NAMES} for r in csv.DictReader(open(out / METRICS_CSV))}
    on_disk = _no_nan((out / SUMMARY_JSON).read_text())
    assert on_disk["count"] == len(rows) == len(cases)
    for name in METRIC_NAMES:  # the summary is the plain mean of the csv column, every value finite
        column = [r[name] for r in rows.values()]
        assert all(math.isfinite(v) for v in column)
        assert on_disk["metrics"][name]["mean"] == pytest.approx(float(np.mean(column)), rel=1e-12, abs=1e-12)
        assert summary["metrics"][name]["mean"] == on_disk["metrics"][name]["mean"]
    return rows, on_disk


def test_empty_prediction_and_both_empty(cases, tmp_path):
    """All-background prediction: a case with foreground (empty prediction) and one without (both empty)."""
    rows, summary = _run(_Constant(foreground=False), cases, tmp_path)
    diagonal = volume_diagonal(SHAPE)
    assert diagonal == pytest.approx(math.sqrt(3 * 16**2))
    assert rows["with_fg"] == {"dice": 0.0, "jaccard": 0.0, "hd95": diagonal, "asd": diagonal}
    assert rows["no_fg"] == dict(BOTH_EMPTY_VALUES) == {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0}
    assert summary["metrics"]["dice"]["mean"] == 0.5
    assert summary["empty_prediction"] == ["with_fg", "no_fg"]
    assert summary["empty_label"] == ["no_fg"]
    assert "no NaN" in summary["empty_case_convention"]


def test_empty_label_with_prediction(cases, tmp_path):
    """All-foreground prediction: the case without foreground has an empty label and a non-empty prediction."""
    rows, summary = _run(_Constant(foreground=True), cases, tmp_path)
    diagonal = volume_diagonal(SHAPE)
    assert rows["no_fg"] == {"dice": 0.0, "jaccard": 0.0, "hd95": diagonal, "asd": diagonal}
    fg = 5 * 5 * 6
    assert rows["with_fg"]["dice"] == pytest.approx(2 * fg / (fg + 16**3))
    assert summary["empty_prediction"] == []
    assert summary["empty_label"] == ["no_fg"]
