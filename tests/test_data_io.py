"""LA h5 reader (real data when present), datalists (h5 layouts, Decathlon JSON), synthetic dataset."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch

from diffcl_algo.convert import make_synthetic_dataset
from diffcl_algo.data import (
    LA_SPACING,
    DataError,
    LoadH5d,
    build_datalists,
    detect_layout,
    la_datalist,
    read_case_list,
    validate_cases,
)

LA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "LA"
needs_la = pytest.mark.skipif(not LA_DIR.is_dir(), reason=f"real LA data not at {LA_DIR}")


@needs_la
def test_real_la_reader_two_cases():
    labeled, unlabeled = la_datalist(LA_DIR, num_labeled=4)
    assert len(labeled) == 4 and len(unlabeled) == 76
    names = read_case_list(LA_DIR / "train.list")
    assert [e["case"] for e in labeled] == names[:4] and [e["case"] for e in unlabeled] == names[4:]
    assert all("label" not in e for e in unlabeled)
    loader = LoadH5d(("image", "label"))
    for entry in labeled[:2]:
        with h5py.File(entry["image"], "r") as f:
            image_ref, label_ref = f["image"][()], f["label"][()]
        d = loader(entry)
        image, label = d["image"], d["label"]
        assert image.shape == (1, *image_ref.shape) == label.shape and image.shape[-1] == 88
        assert image.dtype == torch.float32 and image_ref.dtype == np.float32 and label_ref.dtype == np.uint8
        np.testing.assert_array_equal(image[0].numpy(), image_ref)
        np.testing.assert_array_equal(label[0].numpy(), label_ref)
        assert set(np.unique(label_ref)) == {0, 1}
        np.testing.assert_allclose(np.diag(image.affine.numpy())[:3], LA_SPACING)
        assert image.meta["filename_or_obj"] == entry["image"]
        assert tuple(image.meta["spatial_shape"]) == image_ref.shape
    info = validate_cases(labeled[:2])
    assert all(0 < i["foreground_fraction"] < 0.5 for i in info)


def test_synthetic_la_layout_and_datalists(tmp_path):
    root = make_synthetic_dataset(tmp_path / "LA", num_cases=5, shape=(24, 20, 16), num_test=1)
    assert (root / "2018LA_Seg_Training Set" / "synth_la_000" / "mri_norm2.h5").is_file()
    assert read_case_list(root / "train.list") == [f"synth_la_{i:03d}" for i in range(4)]
    assert read_case_list(root / "test.list") == ["synth_la_004"]
    assert detect_layout(root) == "la"
    labeled, unlabeled = build_datalists(root, num_labeled=1)
    assert [e["case"] for e in labeled] == ["synth_la_000"] and len(unlabeled) == 3
    assert set(labeled[0]) == {"image", "label", "case"} and set(unlabeled[0]) == {"image", "case"}
    all_labeled, none = build_datalists(root, list_name="test.list")
    assert len(all_labeled) == 1 and none == []
    with h5py.File(labeled[0]["image"], "r") as f:
        image, label = f["image"][()], f["label"][()]
    assert image.dtype == np.float32 and label.dtype == np.uint8 and image.shape == (24, 20, 16)
    assert abs(image.mean()) < 1e-4 and abs(image.std() - 1) < 1e-3 and 0 < label.mean() < 0.3
    # foreground brighter than background: learnable
    assert image[label == 1].mean() > image[label == 0].mean() + 1.0
    # deterministic in the seed
    again = make_synthetic_dataset(tmp_path / "LA2", num_cases=5, shape=(24, 20, 16), num_test=1)
    with h5py.File(again / "2018LA_Seg_Training Set" / "synth_la_000" / "mri_norm2.h5", "r") as f:
        np.testing.assert_array_equal(f["image"][()], image)
    with pytest.raises(DataError, match="num_labeled=9"):
        la_datalist(root, num_labeled=9)


def test_synthetic_other_layouts(tmp_path):
    brats = make_synthetic_dataset(tmp_path / "B", num_cases=3, shape=(16, 16, 16), kind="brats", num_test=1)
    assert detect_layout(brats) == "brats"
    labeled, _ = build_datalists(brats)
    assert len(labeled) == 2 and labeled[0]["image"].endswith("data/synth_brats_000.h5")
    assert read_case_list(brats / "val.txt") == read_case_list(brats / "test.txt") == ["synth_brats_002"]
    pancreas = make_synthetic_dataset(tmp_path / "P", num_cases=3, shape=(16, 16, 16), kind="pancreas", num_test=1)
    labeled, _ = build_datalists(pancreas, list_name="test.list")
    assert labeled[0]["image"].endswith("Pancreas_h5/synth_pancreas_002_norm.h5")
    d = LoadH5d()(labeled[0])
    np.testing.assert_allclose(np.diag(d["image"].affine.numpy())[:3], 1.0)  # spacing attribute of the file


def test_decathlon_nifti_datalist_and_loader(tmp_path):
    rng = np.random.default_rng(0)
    entries = []
    for i in range(3):
        image = rng.standard_normal((20, 18, 12)).astype(np.float32)
        label = (rng.random((20, 18, 12)) > 0.8).astype(np.uint8)
        nib.save(nib.Nifti1Image(image, np.diag([0.8, 0.8, 2.0, 1.0])), str(tmp_path / f"img{i}.nii.gz"))
        nib.save(nib.Nifti1Image(label, np.diag([0.8, 0.8, 2.0, 1.0])), str(tmp_path / f"lab{i}.nii.gz"))
        entries.append({"image": f"img{i}.nii.gz", "label": f"lab{i}.nii.gz"})
    entries[2].pop("label")
    (tmp_path / "datalist.json").write_text(json.dumps({"training": entries}))
    labeled, unlabeled = build_datalists(None, datalist=tmp_path / "datalist.json")
    assert [e["case"] for e in labeled] == ["img0", "img1"] and [e["case"] for e in unlabeled] == ["img2"]
    assert Path(labeled[0]["image"]).is_absolute()
    labeled, unlabeled = build_datalists(None, datalist=tmp_path / "datalist.json", num_labeled=1)
    assert len(labeled) == 1 and len(unlabeled) == 2 and "label" not in unlabeled[0]
    d = LoadH5d()(labeled[0])
    assert d["image"].shape == d["label"].shape == (1, 20, 18, 12) and d["image"].dtype == torch.float32
    np.testing.assert_allclose(d["image"].pixdim, (0.8, 0.8, 2.0))
    with pytest.raises(DataError, match="validation"):
        build_datalists(None, datalist=tmp_path / "datalist.json", list_name="validation")
    with pytest.raises(DataError, match="missing.json"):
        build_datalists(None, datalist=tmp_path / "missing.json")


def test_case_list_parsing(tmp_path):
    (tmp_path / "a.txt").write_text("c1\n\n c2 \nc3,extra\n")
    assert read_case_list(tmp_path / "a.txt") == ["c1", "c2", "c3"]
    (tmp_path / "b.txt").write_text("c1\nc1\n")
    with pytest.raises(DataError, match="more than once"):
        read_case_list(tmp_path / "b.txt")
    with pytest.raises(DataError, match="cannot tell"):
        detect_layout(tmp_path)
