"""Tests of case naming (diffcl_algo.data.cases), SaveImaged naming and CaseMetricsWriter outputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
from evaluator import evaluate
from monai.data import MetaTensor
from monai.transforms import SaveImaged
from torch import nn

from diffcl_algo.convert import make_synthetic_dataset
from diffcl_algo.data import LA_SPACING, build_datalists
from diffcl_algo.data.cases import CASE_META_KEY, CaseNamed, case_name, case_name_formatter
from diffcl_algo.evaluation.metrics import METRIC_NAMES, case_metrics, volume_diagonal
from diffcl_algo.inference.chains import eval_preprocessing
from diffcl_algo.networks import VNet

LA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "LA"
SHAPE = (32, 32, 16)
PATCH, STRIDES = (16, 16, 16), (8, 8, 8)
THRESHOLD = 0.8


class ThresholdNet(nn.Module):
    """Logits whose softmax foreground probability exceeds 0.5 exactly where ``image > threshold``."""

    def __init__(self, threshold: float = THRESHOLD) -> None:
        super().__init__()
        self.threshold = threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.threshold - x, x - self.threshold], dim=1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("data"), num_cases=3, shape=SHAPE, num_test=1)


def all_cases(root: Path) -> list[dict]:
    train, _ = build_datalists(root, list_name="train.list")
    test, _ = build_datalists(root, list_name="test.list")
    return train + test


def read_h5(path: str) -> tuple[np.ndarray, np.ndarray]:
    with h5py.File(path, "r") as f:
        return f["image"][()], f["label"][()]


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/d/2018LA_Seg_Training Set/0RZDK210BSMWAA6467LU/mri_norm2.h5", "0RZDK210BSMWAA6467LU"),
        ("/d/data/BraTS19_2013_10_1.h5", "BraTS19_2013_10_1"),
        ("/d/Pancreas_h5/image0001_norm.h5", "image0001"),
        ("/elsewhere/CASE7/mri_norm2.h5", "CASE7"),  # LA file name outside the LA layout: still the folder
        ("/d/imagesTr/la_003.nii.gz", "la_003"),
        ("/d/imagesTr/img.v2.nii.gz", "img.v2"),
        ("scan.nii", "scan"),
    ],
)
def test_case_name(path: str, expected: str) -> None:
    assert case_name(path) == expected


@pytest.mark.parametrize("case", ["synth_la_000", "case.with.dots"])
def test_save_imaged_file_is_case_name(tmp_path: Path, case: str) -> None:
    pred = MetaTensor(torch.ones(1, 4, 4, 2), meta={"filename_or_obj": "/d/x/mri_norm2.h5", CASE_META_KEY: case})
    saver = SaveImaged(
        "pred", output_dir=tmp_path, output_postfix="", separate_folder=False, output_name_formatter=case_name_formatter
    )
    saver({"pred": pred})
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{case}.nii.gz"]


def test_case_name_formatter_falls_back_to_path() -> None:
    la = "/d/2018LA_Seg_Training Set/ABC/mri_norm2.h5"
    assert case_name_formatter({"filename_or_obj": la}) == {"subject": "ABC.nii.gz", "idx": None}
    with pytest.raises(ValueError, match="filename_or_obj"):
        case_name_formatter({})


def test_case_named_sets_key_and_meta(dataset: Path) -> None:
    entry = all_cases(dataset)[0]
    loaded = eval_preprocessing()({k: v for k, v in entry.items() if k != "case"})
    assert loaded["case"] == entry["case"]
    assert loaded["image"].meta[CASE_META_KEY] == entry["case"]
    renamed = CaseNamed("image")({**loaded, "case": "given"})  # the datalist's name wins
    assert renamed["image"].meta[CASE_META_KEY] == "given"


@pytest.mark.parametrize("use_spacing", [False, True])
def test_evaluate_outputs_match_recomputed_metrics(dataset: Path, tmp_path: Path, use_spacing: bool) -> None:
    datalist = all_cases(dataset)
    out = tmp_path / "eval"
    result = evaluate(ThresholdNet(), datalist, out, PATCH, STRIDES, use_spacing=use_spacing)

    names = [d["case"] for d in datalist]
    expected_files = {f"{n}.nii.gz" for n in names} | {"metrics.csv", "metrics_summary.json", "cases.json"}
    assert {p.name for p in out.iterdir()} == expected_files  # and no temporary files left behind
    rows = read_csv(out / "metrics.csv")
    assert list(rows[0]) == ["case", *METRIC_NAMES]
    assert [r["case"] for r in rows] == names
    cases = json.loads((out / "cases.json").read_text())
    assert list(cases) == names
    spacing = LA_SPACING if use_spacing else None
    for row, entry in zip(rows, datalist):
        image, label = read_h5(entry["image"])
        assert cases[entry["case"]] == {
            "image": entry["image"],
            "label": entry["label"],
            "prediction": str(out / f"{entry['case']}.nii.gz"),
        }
        nifti = nib.load(str(out / f"{entry['case']}.nii.gz"))
        pred = np.asarray(nifti.dataobj)
        assert pred.shape == image.shape == SHAPE and pred.dtype == np.uint8
        np.testing.assert_allclose(np.diag(nifti.affine)[:3], LA_SPACING)
        np.testing.assert_array_equal(pred, (image > THRESHOLD).astype(np.uint8))  # voxel-exact, same orientation
        recomputed = case_metrics(pred, label, spacing)
        assert {n: float(row[n]) for n in METRIC_NAMES} == recomputed
    summary = json.loads((out / "metrics_summary.json").read_text())
    assert summary["count"] == len(names)
    assert summary["distance_unit"] == ("mm" if use_spacing else "voxel")
    assert "empty" in summary["empty_case_convention"]
    for n in METRIC_NAMES:
        values = np.array([float(r[n]) for r in rows])
        assert summary["metrics"][n]["mean"] == pytest.approx(values.mean(), rel=1e-12)
        assert summary["metrics"][n]["std"] == pytest.approx(values.std(), rel=1e-12)
    assert 0 < summary["metrics"]["dice"]["mean"] < 1
    assert result["metrics"] == summary["metrics"] and result["output_dir"] == str(out)


def test_evaluate_tiny_vnet(dataset: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    datalist = all_cases(dataset)[:1]
    result = evaluate(VNet(3, 1, 2, n_filters=4), datalist, tmp_path, PATCH, STRIDES)
    pred = nib.load(str(tmp_path / f"{datalist[0]['case']}.nii.gz"))
    assert pred.shape == SHAPE
    assert result["count"] == 1


def test_empty_predictions(dataset: Path, tmp_path: Path) -> None:
    """An all-background network exercises the empty-case values of the metric files and engine metrics."""
    datalist = build_datalists(dataset, list_name="test.list")[0]
    evaluate(nn.Identity(), datalist, tmp_path, PATCH, (16, 16, 16))  # 1 output channel: argmax is background
    summary = json.loads((tmp_path / "metrics_summary.json").read_text())
    assert summary["empty_prediction"] == [datalist[0]["case"]] and summary["empty_label"] == []
    diagonal = volume_diagonal(SHAPE)
    means = {name: stat["mean"] for name, stat in summary["metrics"].items()}
    assert means == {"dice": 0.0, "jaccard": 0.0, "hd95": diagonal, "asd": diagonal}


def test_duplicate_case_names_raise(dataset: Path, tmp_path: Path) -> None:
    entry = all_cases(dataset)[0]
    with pytest.raises(ValueError, match="occurs twice"):
        evaluate(ThresholdNet(), [entry, dict(entry)], tmp_path, PATCH, STRIDES)
    assert not (tmp_path / "metrics.csv").exists()


@pytest.mark.skipif(not LA_DIR.is_dir(), reason="real LA data not available")
def test_evaluate_real_la_case(tmp_path: Path) -> None:
    """One real LA case without a 'case' key: the prediction is named after the case folder, not mri_norm2."""
    entry = build_datalists(LA_DIR, list_name="train.list")[0][0]
    datalist = [{"image": entry["image"], "label": entry["label"]}]
    result = evaluate(ThresholdNet(0.0), datalist, tmp_path, (112, 112, 80), (112, 112, 80))
    image, label = read_h5(entry["image"])
    pred = np.asarray(nib.load(str(tmp_path / f"{entry['case']}.nii.gz")).dataobj)
    assert pred.shape == image.shape
    assert result["metrics"]["dice"]["mean"] == case_metrics(pred, label)["dice"]
