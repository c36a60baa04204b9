"""The CPU-protocol runner and the field's reference recipe (experiments/), at toy size on synthetic LA data."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from diffcl_algo.data.synthetic import make_synthetic_dataset
from diffcl_algo.losses import class_argmax
from diffcl_algo.networks import VNet

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("classes", [2, 3, 5])
def test_class_argmax_equals_argmax(classes):
    logits = torch.randn(2, classes, 9, 8, 7)
    logits[0, :, 0, 0, 0] = 1.0  # a tie: the first class wins, as in torch.argmax
    assert torch.equal(class_argmax(logits), logits.argmax(dim=1, keepdim=True))


@pytest.fixture(scope="module")
def la_copy(tmp_path_factory):
    root = make_synthetic_dataset(tmp_path_factory.mktemp("synthetic") / "la", num_cases=32, shape=(24, 24, 16), seed=3)
    os.remove(root / "test.list")  # the protocol's split comes from train.list alone
    return root


def test_reference_and_bundle_rows_scored_on_the_report_split(la_copy, tmp_path):
    la_cpu = _load("la_cpu")
    toy = f"dataset_dir={la_copy} max_iterations=2"
    la_cpu.run("reference", num_labeled=4, seed=0, set=toy, root=str(tmp_path))
    la_cpu.run("sup", num_labeled=4, seed=1, set=f"{toy} val_interval=1 sup_loss=field", root=str(tmp_path))
    report = (la_copy / "train.list").read_text().split()[-16:]
    ref = json.loads((tmp_path / "reference" / "l4_s0" / "summary.json").read_text())
    sup = json.loads((tmp_path / "sup" / "l4_s1" / "summary.json").read_text())
    assert set(ref) >= {"last"} and "selected" not in ref
    assert set(sup) >= {"last", "selected"} and sup["selected_iteration"] in (1, 2)
    for summary in (ref, sup):
        for kind in ("last", "selected"):
            if kind in summary:
                assert sorted(summary[kind]["cases"]) == sorted(report)
                assert 0.0 <= summary[kind]["mean"]["dice"] <= 1.0
    weights = torch.load(tmp_path / "reference" / "l4_s0" / "model.pt", weights_only=True)
    VNet(3, 1, 2, n_filters=8, residual=False).load_state_dict(weights)
    text = la_cpu.table(rows="reference sup", root=str(tmp_path))
    assert "| reference | 4 | last | 1 |" in text and "| sup | 4 | selected | 1 |" in text
    per_case = la_cpu.cases(rows="reference", num_labeled=4, seed=0, root=str(tmp_path)).splitlines()
    assert [line.split(" | ")[0][2:] for line in per_case[2:]] == sorted(report)
    logged = la_cpu.monitor(rows="sup", num_labeled=4, seed=1, window=1, root=str(tmp_path)).splitlines()
    assert "loss_sup_cs" in logged[1].split() and "pseudo_dice_cs" not in logged[1]  # no CPS in the sup row
    assert [row.split()[0] for row in logged[2:]] == ["1-1", "2-2"]


def test_unknown_row_and_bad_override_are_refused(tmp_path):
    la_cpu = _load("la_cpu")
    with pytest.raises(ValueError, match="unknown row"):
        la_cpu.run("supervised", root=str(tmp_path))
    with pytest.raises(ValueError, match="id=value"):
        la_cpu.run("sup", set="dropout", root=str(tmp_path))
