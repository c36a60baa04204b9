"""The demo end to end at smoke-test scale (``quick=True``), run from a directory outside the repository."""

from __future__ import annotations

import json

import pytest
import torch

from diffcl_algo.demo import MODELS, demo


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


def test_demo_options_reach_both_trainings_and_switches_are_refused(tmp_path):
    demo(output_dir=str(tmp_path / "out"), quick=True, options={"ema_decay": 0.0, "ema_pseudo_labels": False})
    for folder, _ in MODELS.values():  # the options override the demo's own ema_decay
        state = torch.load(tmp_path / "out" / folder / "train_state.pt", map_location="cpu", weights_only=True)
        assert state["cs_ema"] is None, folder
    with pytest.raises(ValueError, match=r"demo options \['use_cps'\]"):
        demo(output_dir=str(tmp_path / "refused"), quick=True, options={"use_cps": False})
    assert not (tmp_path / "refused").exists()  # refused before anything is written
