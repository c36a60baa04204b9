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
    la_cpu.run("sup", num_labeled=4, seed=0, fold=1, set=f"{toy} ema_decay=0.5", name="ema", root=str(tmp_path))
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
    table = la_cpu.table(rows="a", root=str(tmp_path))
    assert "| a | 4 | last | 2 | 4/4 | 0.650 ± 0.000 |" in table  # each seed: its two folds pooled
    with pytest.raises(ValueError, match="share no seed"):
        la_cpu.compare("a", "missing", num_labeled=4, root=str(tmp_path))


def test_ds_scored_alone_from_noise(la_copy, tmp_path):
    la_cpu = _load("la_cpu")
    toy = f"dataset_dir={la_copy} max_iterations=1 use_hfm=false label_signal=symmetric"
    la_cpu.run("cps", num_labeled=4, seed=0, set=toy, ds_eval_steps=2, root=str(tmp_path))
    summary = json.loads((tmp_path / "cps" / "l4_s0" / "summary.json").read_text())
    assert set(summary) >= {"last", "selected", "ds_last"}
    assert sorted(summary["ds_last"]["cases"]) == sorted(summary["last"]["cases"])
    assert "| cps | 4 | ds_last | 1 |" in la_cpu.table(rows="cps", root=str(tmp_path))


def test_hfm_magnitude_compares_the_module_output_with_the_features(tmp_path, capsys):
    root = make_synthetic_dataset(tmp_path / "la", num_cases=3, shape=(52, 50, 34), seed=1)
    magnitude = _load("hfm_magnitude")
    torch.manual_seed(0)
    net = VNet(3, 1, 2, n_filters=4, hfm_stages=(5,), hfm_layer_scale=0.0)
    with torch.no_grad():
        net.hfm["5"].scale.gamma.fill_(0.5)
    torch.save(net.state_dict(), tmp_path / "model.pt")
    magnitude.main(data=str(root), weights=str(tmp_path / "model.pt"), cases=2, inits=1, n_filters=4)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("init seed 0, hfm_layer_scale None: ratio ") and float(lines[0].split()[-1]) > 0.1
    assert lines[1] == "init seed 0, hfm_layer_scale 0.0: ratio 0.000"
    assert "|gamma| mean 0.500 max 0.500" in lines[2]
    # the ratio it prints is the one of the module's own output
    batch = magnitude._patches(str(root), 2)
    half = magnitude.ratio(net, batch, train=False)
    with torch.no_grad():
        net.hfm["5"].scale.gamma.fill_(1.0)
    assert magnitude.ratio(net, batch, train=False) == pytest.approx(2 * half, rel=1e-4)
    assert f"ratio {half:.3f}" in lines[2]


@pytest.mark.parametrize("select", ["similarity", "pseudo_label"])
def test_cl_positives_counts_the_hidden_labels_of_the_selection(la_copy, tmp_path, select):
    la_cpu, cl_positives = _load("la_cpu"), _load("cl_positives")
    toy = (f"dataset_dir={la_copy} max_iterations=2 ema_decay=0.5 ema_pseudo_labels=true cl_select={select} "
           "cl_num_anchors=4 cl_num_unlabeled=256 cl_top_k=16")  # fmt: skip
    la_cpu.run("full", num_labeled=4, seed=0, set=toy, root=str(tmp_path))
    out = cl_positives.measure(str(tmp_path / "full" / "l4_s0"), batches=2)
    measured = [c for c, purity in enumerate(out["purity"]) if purity is not None]
    assert measured  # at least one class reached the bank
    for c in measured:
        assert out["cs_right"][c] + out["corrective"][c] == pytest.approx(out["purity"][c], abs=2e-4)
        assert out["purity"][c] + out["wrong"][c] == pytest.approx(1.0, abs=2e-4)
        assert 0.0 <= out["neg_true"][c] <= 1.0
    assert sum(out["share"][c] for c in measured) <= 1.0 + 2e-4
    assert 0.0 <= out["cs_err_all"] <= 1.0 and 0.0 <= out["teacher_err_all"] <= 1.0
