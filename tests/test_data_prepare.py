"""BraTS / Pancreas / LA preparation on synthetic raw data, atomic writes, overwrite refusal, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from monai.utils import optional_import

from diffcl_algo.convert import make_synthetic_brats_raw, make_synthetic_dataset, make_synthetic_pancreas_raw, prepare
from diffcl_algo.convert.prepare import rescale_case
from diffcl_algo.convert.writers import write_h5
from diffcl_algo.data import DataError, build_datalists, read_case_list, validate_cases

REPO = Path(__file__).resolve().parents[1]


def _read(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    with h5py.File(path, "r") as f:
        return f["image"][()], f["label"][()], dict(f.attrs)


def _brats_files(raw: Path, case: str) -> dict[str, Path]:
    folder = next(raw.glob(f"*GG/{case}"))
    return {m: folder / f"{case}_{m}.nii.gz" for m in ("flair", "t1", "t1ce", "t2", "seg")}


def _expected_brats(flair: np.ndarray, seg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reference at 1 mm input: crop to FLAIR > 0, clip at the 99.9th percentile, z-score over nonzero."""
    idx = np.nonzero(flair)
    box = tuple(slice(i.min(), i.max() + 1) for i in idx)
    img = flair[box].astype(np.float64)
    img = np.minimum(img, np.percentile(img, 99.9))
    nz = img != 0
    img[nz] = (img[nz] - img[nz].mean()) / img[nz].std()
    return img, (seg[box] > 0).astype(np.uint8)


def test_prepare_brats_flair_whole_tumour_zscore(tmp_path):
    raw = tmp_path / "raw"
    cases = make_synthetic_brats_raw(raw, num_cases=2, shape=(40, 44, 30))
    splits = tmp_path / "splits"
    splits.mkdir()
    for name, names in (("train.txt", cases[:1]), ("val.txt", cases[1:]), ("test.txt", cases[1:])):
        (splits / name).write_text("\n".join(names) + "\n")
    summary = prepare("brats", raw, tmp_path / "out", splits_dir=splits)
    assert summary["cases"] == 2 and summary["lists"] == ["train.txt", "val.txt", "test.txt"]
    assert read_case_list(tmp_path / "out" / "val.txt") == cases[1:]
    for case in cases:
        files = _brats_files(raw, case)
        seg = np.asanyarray(nib.load(files["seg"]).dataobj)
        assert set(np.unique(seg)) == {0, 1, 2, 4}
        image, label, attrs = _read(tmp_path / "out" / "data" / f"{case}.h5")
        assert image.dtype == np.float32 and label.dtype == np.uint8
        np.testing.assert_array_equal(attrs["spacing"], [1.0, 1.0, 1.0])
        flair = np.asanyarray(nib.load(files["flair"]).dataobj)
        ref_image, ref_label = _expected_brats(flair, seg)
        assert image.shape == ref_image.shape
        np.testing.assert_allclose(image, ref_image, atol=1e-4)  # FLAIR, and nothing else, was used
        np.testing.assert_array_equal(label, ref_label)  # whole tumour = codes 1, 2, 4
        t1 = np.asanyarray(nib.load(files["t1"]).dataobj)
        assert not np.allclose(image, _expected_brats(t1, seg)[0], atol=1e-2)
    labeled, _ = build_datalists(tmp_path / "out", num_labeled=1)
    validate_cases(labeled)


def test_prepare_brats_resamples_to_1mm(tmp_path):
    raw = tmp_path / "raw"
    spacing = np.array([1.5, 1.25, 2.0])
    (case,) = make_synthetic_brats_raw(raw, num_cases=1, shape=(40, 44, 24), spacing=spacing, seed=3)
    prepare("brats", raw, tmp_path / "out")
    assert read_case_list(tmp_path / "out" / "all.txt") == [case]
    image, label, attrs = _read(tmp_path / "out" / "data" / f"{case}.h5")
    np.testing.assert_array_equal(attrs["spacing"], [1.0, 1.0, 1.0])
    files = _brats_files(raw, case)
    flair = np.asanyarray(nib.load(files["flair"]).dataobj)
    idx = np.nonzero(flair)
    brain_mm = np.array([(i.max() - i.min()) for i in idx]) * spacing  # brain extent in mm
    # 1 mm voxels: the crop spans the brain extent, plus at most one input voxel per side (bilinear blur)
    extent = np.array(image.shape) - 1
    assert np.all((extent >= brain_mm - 1) & (extent <= brain_mm + 2 * spacing)), (image.shape, brain_mm)
    brain = image != 0
    assert abs(image[brain].mean()) < 1e-4 and abs(image[brain].std() - 1) < 1e-3
    seg = np.asanyarray(nib.load(files["seg"]).dataobj)
    tumour_mm3 = (seg > 0).sum() * spacing.prod()
    assert set(np.unique(label)) == {0, 1} and abs(label.sum() - tumour_mm3) / tumour_mm3 < 0.1


def test_prepare_pancreas_window_and_crop(tmp_path):
    raw = tmp_path / "raw"
    ids = make_synthetic_pancreas_raw(raw, num_cases=2, shape=(64, 64, 40))
    out = tmp_path / "out"
    prepare("pancreas", raw, out, pixdim=None, min_size=0, crop_z=True, zscore=False)
    for case_id in ids:
        ct = np.asanyarray(nib.load(raw / "images" / f"PANCREAS_{case_id}.nii.gz").dataobj).astype(np.float64)
        seg = np.asanyarray(nib.load(raw / "labels" / f"label{case_id}.nii.gz").dataobj)
        assert ct.min() == -1024 and ct.max() == 3071
        idx = np.nonzero(seg)
        start = [max(int(i.min()) - 25, 0) for i in idx]
        end = [min(int(i.max()) + 1 + 25, s) for i, s in zip(idx, seg.shape)]
        assert start[2] == 0 or end[2] == seg.shape[2] or end[0] == seg.shape[0]  # the margin meets the border
        box = tuple(slice(a, b) for a, b in zip(start, end))
        image, label, attrs = _read(out / "Pancreas_h5" / f"image{case_id}_norm.h5")
        np.testing.assert_array_equal(attrs["crop_start"], start)
        np.testing.assert_array_equal(attrs["crop_end"], end)
        assert image.shape == label.shape == tuple(b - a for a, b in zip(start, end))
        np.testing.assert_array_equal(label, seg[box])  # label preserved
        np.testing.assert_allclose(image, (np.clip(ct[box], -120, 240) + 120) / 360, atol=1e-6)
        assert image.min() == 0 and image.max() == 1
    # MC-Net defaults: z-scored, 1 mm, all slices kept, in-plane crop at least min_size
    prepare("pancreas", raw, tmp_path / "mcnet")
    image, label, attrs = _read(tmp_path / "mcnet" / "Pancreas_h5" / f"image{ids[0]}_norm.h5")
    np.testing.assert_array_equal(attrs["spacing"], [1.0, 1.0, 1.0])
    assert abs(image.mean()) < 1e-4 and abs(image.std() - 1) < 1e-3
    src = nib.load(raw / "labels" / f"label{ids[0]}.nii.gz")
    extent_mm = np.array(src.shape) * np.array(src.header.get_zooms())
    assert attrs["crop_start"][2] == 0 and abs(image.shape[2] - extent_mm[2]) <= 2
    assert all(image.shape[a] >= min(96, extent_mm[a] - 2) for a in (0, 1))
    volume_mm3 = np.asanyarray(src.dataobj).sum() * np.prod(src.header.get_zooms())
    assert abs(label.sum() - volume_mm3) / volume_mm3 < 0.25  # nearest resampling of a ~400-voxel object
    assert read_case_list(tmp_path / "mcnet" / "all.list") == [f"image{i}" for i in ids]


def test_prepare_refuses_overwrite_and_writes_atomically(tmp_path):
    raw = tmp_path / "raw"
    (case,) = make_synthetic_brats_raw(raw, num_cases=1, shape=(24, 24, 16))
    prepare("brats", raw, tmp_path / "out")
    target = tmp_path / "out" / "data" / f"{case}.h5"
    before = target.stat().st_mtime_ns
    with pytest.raises(DataError, match="refusing to overwrite"):
        prepare("brats", raw, tmp_path / "out")
    assert target.stat().st_mtime_ns == before
    prepare("brats", raw, tmp_path / "out", overwrite=True)
    assert target.stat().st_mtime_ns >= before
    # a write that fails half-way leaves the previous file and no temp file
    with pytest.raises(TypeError):
        write_h5(target, {"image": np.zeros(3), "bad": np.array([object()], dtype=object)})
    assert _read(target)[0].ndim == 3
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]


def test_prepare_input_errors(tmp_path):
    raw = tmp_path / "raw"
    (case,) = make_synthetic_brats_raw(raw, num_cases=1, shape=(24, 24, 16))
    seg = _brats_files(raw, case)["seg"]
    seg.unlink()
    with pytest.raises(DataError, match=f"{seg.parent}: missing seg"):
        prepare("brats", raw, tmp_path / "out")
    with pytest.raises(DataError, match="HGG"):
        prepare("brats", tmp_path / "empty", tmp_path / "out")
    praw = tmp_path / "praw"
    make_synthetic_pancreas_raw(praw, num_cases=1, shape=(32, 32, 16))
    (praw / "labels" / "label0001.nii.gz").unlink()
    with pytest.raises(DataError, match="label0001.nii.gz is missing"):
        prepare("pancreas", praw, tmp_path / "pout")
    with pytest.raises(DataError, match="needs --dst"):
        prepare("pancreas", praw)
    with pytest.raises(ValueError, match="la, brats, pancreas"):
        prepare("acdc", praw, tmp_path / "x")


@pytest.mark.skipif(optional_import("pydicom")[1], reason="pydicom is installed")
def test_pancreas_dicom_without_pydicom(tmp_path):
    raw = tmp_path / "raw"
    make_synthetic_pancreas_raw(raw, num_cases=1, shape=(32, 32, 16))
    (raw / "images" / "PANCREAS_0001.nii.gz").unlink()
    (raw / "images" / "PANCREAS_0001" / "study" / "series").mkdir(parents=True)
    (raw / "images" / "PANCREAS_0001" / "study" / "series" / "1-001.dcm").write_bytes(b"x")
    with pytest.raises(DataError, match="pip install pydicom"):
        prepare("pancreas", raw, tmp_path / "out")


def test_prepare_la_report(tmp_path):
    root = make_synthetic_dataset(tmp_path / "LA", num_cases=4, shape=(16, 16, 12), num_test=1)
    report = prepare("la", root, tmp_path / "report")
    assert report["lists"]["train.list"]["cases"] == 3 and report["lists"]["test.list"]["cases"] == 1
    assert json.loads((tmp_path / "report" / "la_report.json").read_text()) == report
    with pytest.raises(DataError, match="refusing to overwrite"):
        prepare("la", root, tmp_path / "report")


def test_rescale_case_area_and_majority_label():
    image = np.arange(4 * 4 * 2, dtype=np.float32).reshape(4, 4, 2)
    label = np.zeros((4, 4, 2), np.uint8)
    label[:2, :2, :] = 1  # one full 2x2x2 block -> one foreground voxel
    label[2, 2, 0] = 1  # 1 of 8 voxels of another block -> background
    small_image, small_label = rescale_case(image, label, 0.5, 2)
    assert small_image.shape == small_label.shape == (2, 2, 1)
    np.testing.assert_allclose(small_image[0, 0, 0], image[:2, :2, :].mean())
    assert small_label.dtype == np.uint8 and small_label.tolist() == [[[1], [0]], [[0], [0]]]


def test_prepare_la_half_resolution_copy(tmp_path):
    root = make_synthetic_dataset(tmp_path / "LA", num_cases=3, shape=(16, 20, 12), num_test=1)
    dst = tmp_path / "half"
    report = prepare("la", root, dst, scale=0.5)
    assert report["scale"] == 0.5
    train = build_datalists(dst, list_name="train.list", layout="la")[0]
    test = build_datalists(dst, list_name="test.list", layout="la")[0]
    assert [e["case"] for e in train + test] == read_case_list(root / "train.list") + read_case_list(root / "test.list")
    for entry in train + test:
        with h5py.File(entry["image"]) as f, h5py.File(root / Path(entry["image"]).relative_to(dst)) as g:
            assert f["image"].shape == f["label"].shape == (8, 10, 6)
            np.testing.assert_allclose(f.attrs["spacing"], [1.25] * 3)
            assert abs(f["label"][()].mean() - g["label"][()].mean()) < 0.05  # foreground fraction kept
    assert [i["shape"] for i in validate_cases(train + test)] == [(8, 10, 6)] * 3
    with pytest.raises(DataError, match="refusing to overwrite"):
        prepare("la", root, dst, scale=0.5)
    with pytest.raises(DataError, match="needs --dst"):
        prepare("la", root, scale=0.5)
    with pytest.raises(DataError, match=r"\(0, 1\]"):
        prepare("la", root, tmp_path / "x", scale=2)


def test_cli_prepare_brats(tmp_path):
    raw = tmp_path / "raw"
    (case,) = make_synthetic_brats_raw(raw, num_cases=1, shape=(24, 24, 16))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "diffcl_algo", "prepare", "brats", "--src", str(raw), "--dst", str(tmp_path / "out")]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "data" / f"{case}.h5").is_file()
    assert read_case_list(tmp_path / "out" / "all.txt") == [case]
