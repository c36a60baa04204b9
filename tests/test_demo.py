"""The demo end to end at smoke-test scale (``quick=True``), run from a directory outside the repository, its
command-line help, and the property of its synthetic dataset (:func:`make_shifted_dataset`): the distribution shift
is in the unlabeled, validation and test cases only."""

from __future__ import annotations

import json
import re

import h5py
import numpy as np
import pytest
import torch

from diffcl_algo.cli import main
from diffcl_algo.convert.synthetic import REFERENCE_CONTRAST, make_shifted_dataset
from diffcl_algo.data.io import LAYOUTS
from diffcl_algo.demo import MODELS, demo


def read_cases(root, list_name):
    """``[(case, contrast attribute, image, label)]`` of a synthetic LA-layout case list, in list order."""
    cases = []
    for name in (root / list_name).read_text().split():
        with h5py.File(root / LAYOUTS["la"].format(case=name), "r") as f:
            cases.append((name, float(f.attrs["contrast"]), f["image"][...], f["label"][...].astype(bool)))
    return cases


def step(image, label):
    """Foreground minus background mean intensity of a z-scored image: the contrast the network sees."""
    return float(image[label].mean() - image[~label].mean())


def test_shifted_dataset_shift_is_in_the_unlabeled_and_test_cases_only(tmp_path):
    low, high = 0.8, REFERENCE_CONTRAST
    root = make_shifted_dataset(tmp_path, num_labeled=3, num_unlabeled=6, num_val=2, num_test=4, seed=1,
                                contrast_range=(low, high))  # fmt: skip
    train, test = read_cases(root, "train.list"), read_cases(root, "test.list")
    assert [len(train), len(test)] == [11, 4]
    assert [c[0] for c in train + test] == [f"synth_la_{i:03d}" for i in range(15)]
    labeled, unlabeled, val = train[:3], train[3:9], train[9:]
    assert all(c[1] == REFERENCE_CONTRAST for c in labeled)
    for group in (unlabeled, val, test):  # stratified: each group spans the range, one case per equal sub-interval
        contrasts = np.sort([c[1] for c in group])
        edges = low + (high - low) * np.arange(len(group) + 1) / len(group)
        assert np.all((edges[:-1] <= contrasts) & (contrasts <= edges[1:])), contrasts
    for _, _, image, label in train + test:
        assert image.dtype == np.float32 and label.any() and not label.all()
        assert abs(float(image.mean())) < 1e-4 and abs(float(image.std()) - 1.0) < 1e-3  # z-scored
    # what the network sees (the foreground step of the z-scored image, which the smooth bias field blurs case by
    # case): on average the labeled cases stand out more than the low-contrast half of the others
    others = sorted(unlabeled + val + test, key=lambda c: c[1])
    low_half = others[: len(others) // 2]
    assert np.mean([step(c[2], c[3]) for c in labeled]) > np.mean([step(c[2], c[3]) for c in low_half]) + 0.3
    # no shift: every case at the reference contrast; the same seed gives the same files
    same = make_shifted_dataset(tmp_path / "flat", num_test=2, shape=(24, 24, 16), contrast_range=(high, high))
    assert {c[1] for c in read_cases(same, "train.list") + read_cases(same, "test.list")} == {REFERENCE_CONTRAST}
    again = make_shifted_dataset(tmp_path / "again", num_labeled=3, num_unlabeled=6, num_val=2, num_test=4, seed=1,
                                 contrast_range=(low, high))  # fmt: skip
    for a, b in zip(train + test, read_cases(again, "train.list") + read_cases(again, "test.list")):
        assert a[1] == b[1] and np.array_equal(a[2], b[2]) and np.array_equal(a[3], b[3])
    with pytest.raises(ValueError, match="contrast_range"):
        make_shifted_dataset(tmp_path / "bad", contrast_range=(0.0, 1.0))
    with pytest.raises(ValueError, match="num_unlabeled"):
        make_shifted_dataset(tmp_path / "bad", num_unlabeled=0)


def test_demo_help_has_one_text_per_option(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    helps = dict(re.findall(r"--(\w+) \[?VALUE\]? (.+?) \(default: ", text))
    for name in ("num_labeled", "num_unlabeled", "num_test", "contrast_range", "seed", "iterations", "options"):
        assert helps.get(name), name
    assert len(set(helps.values())) == len(helps), helps


def test_demo_quick_writes_report(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the demo must not depend on the working directory
    summary = demo(output_dir="out", quick=True)
    out = tmp_path / "out"
    assert summary["output_dir"] == str(out)
    for name in ("metrics.md", "metrics.csv", "curves.png", "overlay_best.png", "overlay_worst.png"):
        assert (out / "report" / name).is_file(), name
    assert set(summary["models"]) == set(MODELS)
    for folder, _ in MODELS.values():
        assert (out / folder / "model.pt").is_file()
        assert (out / folder / "eval" / "metrics_summary.json").is_file()
        state = torch.load(out / folder / "train_state.pt", map_location="cpu", weights_only=True)
        assert state["cs_ema"] is not None, folder  # the bundle's default: the average (and the mean teacher)
    table = (out / "report" / "metrics.md").read_text()
    assert all(name in table for name in MODELS)
    saved = json.loads((out / "demo_summary.json").read_text())
    assert 0.0 <= saved["models"]["Diff-CL"]["dice"] <= 1.0
    # the data: the labeled cases at the reference contrast, the rest spread below it (the 2 validation cases end
    # train.list, 8 test cases by default)
    train, test = read_cases(out / "data", "train.list"), read_cases(out / "data", "test.list")
    assert [len(train), len(test)] == [3 + 9 + 2, 8]
    assert [c[1] for c in train[:3]] == [REFERENCE_CONTRAST] * 3
    assert all(0.8 <= c[1] <= REFERENCE_CONTRAST for c in train[3:] + test)
    assert min(c[1] for c in train[3:]) < 0.9 and min(c[1] for c in test) < 0.9


def test_demo_options_reach_both_trainings_and_switches_are_refused(tmp_path):
    demo(output_dir=str(tmp_path / "out"), quick=True, options={"ema_decay": 0.0})
    for folder, _ in MODELS.values():  # the options override the demo's own ema_decay
        state = torch.load(tmp_path / "out" / folder / "train_state.pt", map_location="cpu", weights_only=True)
        assert state["cs_ema"] is None, folder
    with pytest.raises(ValueError, match=r"demo options \['use_cps'\]"):
        demo(output_dir=str(tmp_path / "refused"), quick=True, options={"use_cps": False})
    with pytest.raises(ValueError, match="seed must be one integer"):  # --seed 0,1,2 on the command line
        demo(output_dir=str(tmp_path / "refused"), quick=True, seed=(0, 1, 2))
    assert not (tmp_path / "refused").exists()  # refused before anything is written
