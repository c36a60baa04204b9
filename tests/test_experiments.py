"""The CPU-protocol runner and the field's reference recipe (experiments/), at toy size on synthetic LA data."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from diffcl_algo.convert.synthetic import make_synthetic_dataset
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
    la_cpu.run("sup", num_labeled=4, seed=1, set=f"{toy} val_interval=1", root=str(tmp_path))
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


def test_report_fold_run_reports_on_its_block(la_copy, tmp_path):
    la_cpu = _load("la_cpu")
    la_cpu.run("sup", num_labeled=4, seed=0, fold=1, set=f"dataset_dir={la_copy} max_iterations=1", root=str(tmp_path))
    summary = json.loads((tmp_path / "sup" / "l4_s0_f1" / "summary.json").read_text())
    train = (la_copy / "train.list").read_text().split()
    block = (train[-16:] + train[:-16])[-16:]  # fold 1: the list rotated by 16, its last 16 (wrapping past the start)
    assert summary["fold"] == 1 and sorted(summary["last"]["cases"]) == sorted(block)


def test_average_scores_the_student_and_the_average_with_its_statistics(la_copy, tmp_path):
    la_cpu = _load("la_cpu")
    toy = f"dataset_dir={la_copy} max_iterations=2"
    la_cpu.run("sup_avg", num_labeled=4, seed=0, fold=1, set=f"{toy} ema_decay=0.5", name="ema", root=str(tmp_path))
    means = la_cpu.average("ema", num_labeled=4, seed=0, fold=1, root=str(tmp_path))
    run_dir = tmp_path / "ema" / "l4_s0_f1"
    summary = json.loads((run_dir / "summary.json").read_text())
    state = torch.load(run_dir / "train_state.pt", weights_only=True)
    student = torch.load(run_dir / "model_student.pt", weights_only=True)
    mixed = torch.load(run_dir / "model_average_student_bn.pt", weights_only=True)
    average = {k.removeprefix("module."): v for k, v in state["cs_ema"].items() if k != "n_averaged"}
    assert all(torch.equal(student[k], state["cs_network"][k]) for k in student)
    for key, value in mixed.items():
        assert torch.equal(value, (student if "running_" in key or "num_batches" in key else average)[key]), key
    assert sorted(summary["student"]["cases"]) == sorted(summary["last"]["cases"])  # the run's own report block
    assert means == {k: round(summary[k]["mean"]["dice"], 4) for k in ("last", "student", "average_student_bn")}
    la_cpu.run("sup", num_labeled=4, seed=0, set=toy, name="plain", root=str(tmp_path))
    with pytest.raises(ValueError, match="holds no average of the CS weights"):
        la_cpu.average("plain", num_labeled=4, seed=0, root=str(tmp_path))


def _summary(root, name, seed, fold, dice):
    folder = root / name / (f"l4_s{seed}" + (f"_f{fold}" if fold else ""))
    folder.mkdir(parents=True)
    cases = {case: {"dice": d, "jaccard": d, "hd95": 1.0, "asd": 1.0} for case, d in dice.items()}
    summary = {"num_labeled": 4, "seed": seed, "fold": fold, "last": {"mean": {}, "cases": cases}}
    (folder / "summary.json").write_text(json.dumps(summary))


def test_compare_pairs_cases_over_seeds_and_folds(tmp_path):
    la_cpu = _load("la_cpu")
    for seed in (0, 1):  # row a is better than b by 0.1 on every case but one, both folds of each seed
        _summary(tmp_path, "a", seed, 0, {"c1": 0.8, "c2": 0.7})
        _summary(tmp_path, "a", seed, 1, {"c3": 0.6, "c4": 0.5})
        _summary(tmp_path, "b", seed, 0, {"c1": 0.7, "c2": 0.6})
        _summary(tmp_path, "b", seed, 1, {"c3": 0.5, "c4": 0.5})
    text = la_cpu.compare("a", "b", num_labeled=4, root=str(tmp_path))
    assert "4 cases x 2 seeds" in text and "| a | 0.650 ± 0.000 |" in text and "| b | 0.575 ± 0.000 |" in text
    assert "a better on 3, worse on 0, equal on 1" in text and "Wilcoxon" in text
    fold1 = la_cpu.compare("a", "b", num_labeled=4, root=str(tmp_path), folds="1")  # c3 +0.1, c4 equal
    assert "2 cases x 2 seeds" in fold1 and "difference per seed: +0.050, +0.050" in fold1
    table = la_cpu.table(rows="a", root=str(tmp_path))
    assert "| a | 4 | last | 2 | 4/4 | 0.650 ± 0.000 |" in table  # each seed: its two folds pooled
    with pytest.raises(ValueError, match="share no seed"):
        la_cpu.compare("a", "missing", num_labeled=4, root=str(tmp_path))
    for seed in (0, 1):  # the default baselines: both supervised-only rows, with and without the weight average
        for name, d in (("sup_avg", 0.75), ("sup", 0.6)):
            _summary(tmp_path, name, seed, 0, {"c1": d, "c2": d})
    both = la_cpu.compare("a", num_labeled=4, root=str(tmp_path)).split("\n\n")
    assert both[0].startswith("a vs sup_avg, 4 labeled") and both[1].startswith("a vs sup, 4 labeled")
    assert "mean difference +0.000, median +0.000" in both[0]  # a: 0.8, 0.7 against 0.75 on both cases


def test_ds_scored_alone_from_noise_and_the_pseudo_label_monitor(la_copy, tmp_path):
    """``--ds_eval_steps``: the DS's last weights scored alone; ``--monitor``: the training carries
    ``experiments/monitor.yaml`` through the stock CLI, and ``monitor`` tabulates its pseudo-label Dice."""
    la_cpu = _load("la_cpu")
    toy = f"dataset_dir={la_copy} max_iterations=2 use_hfm=false"
    la_cpu.run("cps", num_labeled=4, seed=0, set=toy, ds_eval_steps=2, root=str(tmp_path), monitor=True)
    summary = json.loads((tmp_path / "cps" / "l4_s0" / "summary.json").read_text())
    assert set(summary) >= {"last", "selected", "ds_last"}
    assert sorted(summary["ds_last"]["cases"]) == sorted(summary["last"]["cases"])
    assert "| cps | 4 | ds_last | 1 |" in la_cpu.table(rows="cps", root=str(tmp_path))
    logged = la_cpu.monitor(rows="cps", num_labeled=4, seed=0, window=1, root=str(tmp_path)).splitlines()
    assert logged[1].split()[1:3] == ["pseudo_dice_cs", "pseudo_dice_ds"]
    assert all(0.0 <= float(v) <= 1.0 for row in logged[2:] for v in row.split()[1:3])


def test_curve_puts_the_room_beside_the_budget(la_copy, tmp_path):
    """``curve``: one line per budget, the low and high labeled rows' mean (median) Dice, minutes and their gap."""
    la_cpu = _load("la_cpu")
    for labeled in (2, 4):
        la_cpu.run("sup_avg", num_labeled=labeled, seed=0, set=f"dataset_dir={la_copy} max_iterations=2",
                   name="i2", root=str(tmp_path))  # fmt: skip
    lines = la_cpu.curve("i2", low=2, high=4, root=str(tmp_path)).splitlines()
    assert lines[0].startswith("| budget | iterations | minutes / run (LA 2, 4) |") and len(lines) == 3
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    mean = {n: json.loads((tmp_path / "i2" / f"l{n}_s0" / "summary.json").read_text())["last"]["mean"]["dice"]
            for n in (2, 4)}  # fmt: skip
    assert cells[:2] == ["i2", "2"] and cells[3].startswith(f"{mean[2]:.3f} (")
    assert cells[5] == f"{mean[4] - mean[2]:+.3f}"
    assert all(float(m) >= 0 for m in cells[2].split(", "))
    with pytest.raises(ValueError, match="no scored run at 8"):
        la_cpu.curve("i2", low=8, high=4, root=str(tmp_path))


def test_shipped_weights_scores_the_report_or_the_selection_cases():
    """``shipped_weights.py --split``: fold 0's report cases (the last 16) or the 8 selection cases before them, the
    blocks of ``cpu.yaml``'s split, never overlapping."""
    split_cases = _load("shipped_weights").split_cases
    listed = [f"case{i:02d}" for i in range(80)]
    report, selection = split_cases(listed), split_cases(listed, split="selection")
    assert report == listed[64:] and selection == listed[56:64]
    with pytest.raises(ValueError, match="split"):
        split_cases(listed, split="test")


def test_resume_continues_an_interrupted_run_and_leaves_a_scored_one(la_copy, tmp_path):
    """``run --resume``: a run whose training stopped (here: the budget raised after it) continues from its
    ``train_state.pt`` instead of starting over; a run with a ``summary.json`` is not touched."""
    la_cpu = _load("la_cpu")
    toy = f"dataset_dir={la_copy} ckpt_interval=1 val_interval=1"
    la_cpu.run("sup", num_labeled=4, seed=0, set=f"{toy} max_iterations=2", root=str(tmp_path))
    run_dir = tmp_path / "sup" / "l4_s0"
    (run_dir / "summary.json").unlink()  # as if it had stopped before its scores
    la_cpu.run("sup", num_labeled=4, seed=0, set=f"{toy} max_iterations=3", root=str(tmp_path), resume=True)
    state = torch.load(run_dir / "train_state.pt", map_location="cpu", weights_only=True)
    log = (run_dir / "train.out").read_text()
    assert f"Resumed from {run_dir / 'train_state.pt'} at iteration 2" in log
    assert int(state["iteration"]) == 3 and (run_dir / "summary.json").exists()
    before = (run_dir / "summary.json").stat().st_mtime_ns
    la_cpu.run("sup", num_labeled=4, seed=0, set=f"{toy} max_iterations=4", root=str(tmp_path), resume=True)
    assert (run_dir / "summary.json").stat().st_mtime_ns == before
