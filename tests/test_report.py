"""Tests of diffcl_algo.evaluation.report on a synthetic run: TensorBoard curves, metric tables, overlays,
missing inputs."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import fire
import nibabel as nib
import numpy as np
import pytest
import torch
from evaluator import evaluate
from PIL import Image
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from diffcl_algo.convert import make_synthetic_dataset
from diffcl_algo.data import build_datalists
from diffcl_algo.evaluation.metrics import METRIC_NAMES
from diffcl_algo.evaluation.report import format_mean_std, load_scalars, report

LOSS_TAGS = [
    "loss_sup_cs",
    "loss_sup_ds",
    "loss_cps_cs",
    "loss_cps_ds",
    "loss_cl",
    "loss_cs",
    "loss_ds",
    "loss",
]
TRAIN_TAGS = [*LOSS_TAGS, "ramp", "lr_cs", "lr_ds"]
VAL_TAGS = ["val_mean_dice", "val_hd95"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class ThresholdNet(nn.Module):
    """Foreground where ``image > threshold`` (synthetic images are ``1.5 * label`` + noise)."""

    def __init__(self, threshold: float) -> None:
        super().__init__()
        self.threshold = threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.threshold - x, x - self.threshold], dim=1)


def write_events(run_dir: Path, iterations: int = 30, val_every: int = 10, scale: float = 1.0) -> None:
    """An event file like the trainer's: loss terms, ramp and learning rates per iteration, validation metrics."""
    writer = SummaryWriter(log_dir=str(run_dir))
    for it in range(1, iterations + 1):
        for i, tag in enumerate(TRAIN_TAGS):
            writer.add_scalar(tag, scale * (1.0 + i) / it, it)
        if it % val_every == 0:
            writer.add_scalar("val_mean_dice", it / iterations, it)
            writer.add_scalar("val_hd95", 10.0 / it, it)
    writer.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Two evaluated runs on the same synthetic cases ("Diff-CL" better than "supervised")."""
    root = tmp_path_factory.mktemp("report")
    data = make_synthetic_dataset(root / "data", num_cases=3, shape=(32, 32, 16), num_test=1)
    datalist = build_datalists(data, list_name="train.list")[0] + build_datalists(data, list_name="test.list")[0]
    out = {}
    for name, threshold, scale in (("Diff-CL", 0.8, 1.0), ("supervised", 1.4, 2.0)):
        run_dir, eval_dir = root / name / "run", root / name / "eval"
        write_events(run_dir, scale=scale)
        evaluate(ThresholdNet(threshold), datalist, eval_dir, (16, 16, 16), (8, 8, 8))
        out[name] = (run_dir, eval_dir)
    return out


def assert_png(path: Path) -> None:
    assert path.stat().st_size > 0
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as img:
        img.verify()


def eval_rows(eval_dir: Path) -> list[dict]:
    with (eval_dir / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_load_scalars(runs: dict) -> None:
    scalars = load_scalars(runs["Diff-CL"][0])
    assert list(scalars) == [*TRAIN_TAGS, *VAL_TAGS]
    steps, values = scalars["val_mean_dice"]
    np.testing.assert_array_equal(steps, [10, 20, 30])
    np.testing.assert_allclose(values, [1 / 3, 2 / 3, 1.0], rtol=1e-6)


def test_single_run_report(runs: dict) -> None:
    run_dir, eval_dir = runs["Diff-CL"]
    result = report(run_dir, eval_dir)
    out = run_dir / "report"
    assert result["output_dir"] == str(out)
    names = ["curves.png", "metrics.md", "metrics.csv", "overlay_best.png", "overlay_worst.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)  # no temporary files left
    for name in names[:1] + names[3:]:
        assert_png(out / name)
    assert result["curve_tags"] == [*TRAIN_TAGS, *VAL_TAGS]  # one panel per tag: losses, ramp, lr, validation

    rows = eval_rows(eval_dir)
    summary = json.loads((eval_dir / "metrics_summary.json").read_text())["metrics"]
    markdown = (out / "metrics.md").read_text()
    for row in rows:
        assert f"| {row['case']} | {100 * float(row['dice']):.2f} |" in markdown
    for n in METRIC_NAMES:
        assert format_mean_std(n, summary[n]["mean"], summary[n]["std"]) in markdown
    assert "±" in format_mean_std("dice", 0.9, 0.01) == "90.00 ± 1.00"
    dices = {r["case"]: float(r["dice"]) for r in rows}
    assert result["best_case"] == max(dices, key=dices.get)
    assert result["worst_case"] == min(dices, key=dices.get)
    assert result["best_case"] != result["worst_case"]

    with (out / "metrics.csv").open(newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["case"] for r in table] == [r["case"] for r in rows] + ["mean", "std"]
    for n in METRIC_NAMES:
        assert float(table[-2][n]) == pytest.approx(summary[n]["mean"], rel=1e-12)
        assert float(table[-1][n]) == pytest.approx(summary[n]["std"], rel=1e-12)


def test_runs_side_by_side(runs: dict, tmp_path: Path) -> None:
    result = report(runs={name: (str(r), str(e)) for name, (r, e) in runs.items()}, output_dir=tmp_path / "cmp")
    out = tmp_path / "cmp"
    markdown = (out / "metrics.md").read_text()
    assert "| Diff-CL | 3 |" in markdown and "| supervised | 3 |" in markdown
    assert "supervised Dice (%)" in markdown
    with (out / "metrics.csv").open(newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["run"] for r in table] == ["Diff-CL"] * 5 + ["supervised"] * 5
    assert set(result["summary"]) == {"Diff-CL", "supervised"}
    assert result["summary"]["Diff-CL"]["dice"]["mean"] != result["summary"]["supervised"]["dice"]["mean"]
    assert result["curve_tags"] == [*TRAIN_TAGS, *VAL_TAGS]
    for name in ("curves.png", "overlay_best.png", "overlay_worst.png"):
        assert_png(out / name)
    single = report(*runs["Diff-CL"], output_dir=tmp_path / "single")
    assert single["best_case"] == result["best_case"]  # the first run picks the cases
    with Image.open(out / "overlay_best.png") as two_rows, Image.open(tmp_path / "single" / "overlay_best.png") as one:
        assert two_rows.height > 1.7 * one.height  # one row of slices per run


def test_curves_only_without_eval_dir(runs: dict, tmp_path: Path) -> None:
    result = report(runs["Diff-CL"][0], output_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png"]
    assert result["best_case"] is None and result["summary"] == {}


def test_cli_arguments_through_fire(runs: dict, tmp_path: Path) -> None:
    """The argument forms of ``python -m diffcl_algo report`` (fire), including a JSON ``--runs`` mapping."""
    run_dir, eval_dir = runs["Diff-CL"]
    result = fire.Fire(
        report, command=["--run_dir", str(run_dir), "--eval_dir", str(eval_dir), "--output_dir", str(tmp_path / "a")]
    )
    assert set(result["files"]) == {"curves", "metrics_md", "metrics_csv", "overlay_best", "overlay_worst"}
    spec = json.dumps({name: [str(r), str(e)] for name, (r, e) in runs.items()})
    result = fire.Fire(report, command=["--runs", spec, "--output_dir", str(tmp_path / "b")])
    assert list(result["summary"]) == ["Diff-CL", "supervised"]


def test_missing_inputs_raise_naming_the_file(runs: dict, tmp_path: Path) -> None:
    run_dir, eval_dir = runs["Diff-CL"]
    out = tmp_path / "report"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="events.out.tfevents"):
        report(empty, eval_dir, output_dir=out)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        report(tmp_path / "nope", output_dir=out)
    with pytest.raises(FileNotFoundError, match=str(empty / "metrics.csv")):
        report(run_dir, empty, output_dir=out)
    partial = tmp_path / "partial"
    shutil.copytree(eval_dir, partial)
    (partial / "cases.json").unlink()
    with pytest.raises(FileNotFoundError, match=str(partial / "cases.json")):
        report(run_dir, partial, output_dir=out)
    cases = json.loads((eval_dir / "cases.json").read_text())
    best = max(eval_rows(eval_dir), key=lambda r: float(r["dice"]))["case"]
    cases[best]["prediction"] = str(tmp_path / "moved" / f"{best}.nii.gz")
    (partial / "cases.json").write_text(json.dumps(cases))
    with pytest.raises(FileNotFoundError, match=f"moved/{best}.nii.gz"):
        report(run_dir, partial, output_dir=out)
    with pytest.raises(ValueError, match="runs or run_dir"):
        report(run_dir, runs={"a": (run_dir, eval_dir)})
    with pytest.raises(ValueError, match="needs run_dir"):
        report()
    assert not out.exists()  # inputs are checked before anything is written


def test_worst_overlay_shows_the_slices_of_largest_error(tmp_path: Path) -> None:
    """The worst case's error lies off-centre (a false-positive block in a corner): the overlay cuts through it,
    not through the label's centre, where that case's prediction is right; the best case keeps the centre."""
    shape = (32, 32, 16)
    image = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[12:20, 12:20, 6:10] = 1  # centre of mass (16, 16, 8)
    worst = label.copy()
    worst[2:6, 24:30, 1:3] = 1  # false positives far from the label: slices x=2, y=24, z=1 hold the most
    worst[12, 12, 6] = 0  # one false negative at the label's edge
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    paths = {}
    for name, array in (("image", image), ("label", label), ("best", label), ("worst", worst)):
        paths[name] = str(tmp_path / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(array, np.eye(4)), paths[name])
    rows = [{"case": "best", "dice": 1.0}, {"case": "worst", "dice": 0.5}]
    with (eval_dir / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["case", *METRIC_NAMES])
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "jaccard": row["dice"], "hd95": 1.0, "asd": 1.0})
    cases = {c: {"image": paths["image"], "label": paths["label"], "prediction": paths[c]} for c in ("best", "worst")}
    (eval_dir / "cases.json").write_text(json.dumps(cases))

    result = report(eval_dir=eval_dir, output_dir=tmp_path / "report")
    assert result["worst_case"] == "worst" and result["best_case"] == "best"
    assert result["overlay_slices"] == {"best": [16, 16, 8], "worst": [2, 24, 1]}
    assert_png(tmp_path / "report" / "overlay_worst.png")
