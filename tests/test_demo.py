"""The demo end to end at smoke-test scale (``quick=True``), run from a directory outside the repository."""

from __future__ import annotations

import json

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
    table = (out / "report" / "metrics.md").read_text()
    assert all(name in table for name in MODELS)
    saved = json.loads((out / "demo_summary.json").read_text())
    assert 0.0 <= saved["models"]["Diff-CL"]["dice"] <= 1.0
