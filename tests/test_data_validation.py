"""Every bad-data case raises DataError naming the path (or warns, for an empty label)."""

from __future__ import annotations

import warnings
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

from diffcl_algo.data import DataError, la_datalist, validate_cases
from diffcl_algo.data.splits import CaseSplits, inference_cases

SHAPE = (12, 10, 8)


def _la_case(root: Path, case: str, image=None, label=None, datasets=("image", "label")) -> Path:
    """Write one LA-layout case; returns its h5 path."""
    rng = np.random.default_rng(0)
    image = rng.standard_normal(SHAPE).astype(np.float32) if image is None else image
    if label is None:
        label = np.zeros(SHAPE, np.uint8)
        label[3:6, 3:6, 2:5] = 1
    path = root / "2018LA_Seg_Training Set" / case / "mri_norm2.h5"
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        if "image" in datasets:
            f.create_dataset("image", data=image)
        if "label" in datasets:
            f.create_dataset("label", data=label)
    return path


def _entry(path: Path, labeled: bool = True) -> dict:
    return {"image": str(path), "label": str(path), "case": path.parent.name} if labeled else {"image": str(path)}


def _fails(entries, match: str, num_classes: int = 2, check_values: bool = True) -> str:
    with pytest.raises(DataError, match=match) as info:
        validate_cases(entries, num_classes, check_values)
    return str(info.value)


def test_layout_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=str(missing)) as info:
        la_datalist(missing)
    assert "2018LA_Seg_Training Set/<case>/mri_norm2.h5" in str(info.value)  # the expected layout is stated
    tmp_path.joinpath("LA").mkdir()
    with pytest.raises(DataError, match=str(tmp_path / "LA" / "train.list")):
        la_datalist(tmp_path / "LA")
    root = tmp_path / "LA"
    _la_case(root, "ok")
    (root / "2018LA_Seg_Training Set" / "nofile").mkdir()
    (root / "train.list").write_text("ok\nnofolder\nnofile\n")
    with pytest.raises(DataError) as info:
        la_datalist(root)
    message = str(info.value)
    assert f"case folder {root / '2018LA_Seg_Training Set' / 'nofolder'} is missing" in message
    assert f"case file {root / '2018LA_Seg_Training Set' / 'nofile' / 'mri_norm2.h5'} is missing" in message
    assert "2 of 3 cases" in message


def test_corrupt_and_truncated_files(tmp_path):
    garbage = _la_case(tmp_path, "garbage")
    garbage.write_bytes(b"this is not an hdf5 file" * 10)
    _fails([_entry(garbage)], f"{garbage}: cannot be read")

    big = np.random.default_rng(1).standard_normal((40, 40, 40)).astype(np.float32)
    truncated = _la_case(tmp_path, "truncated", image=big, label=np.zeros(big.shape, np.uint8))
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    _fails([_entry(truncated)], str(truncated))

    nii = tmp_path / "image.nii.gz"
    nib.save(nib.Nifti1Image(big, np.eye(4)), str(nii))
    raw = nii.read_bytes()
    nii.write_bytes(raw[: len(raw) // 2])
    _fails([{"image": str(nii)}], f"{nii}: cannot be read")

    missing = tmp_path / "missing.h5"
    _fails([_entry(missing)], f"{missing}: file does not exist")


def test_missing_datasets(tmp_path):
    no_label = _la_case(tmp_path, "nolabel", datasets=("image",))
    _fails([_entry(no_label)], rf"{no_label}: missing h5 dataset\(s\) \['label'\]")
    validate_cases([_entry(no_label, labeled=False)])  # unlabeled entries do not need it
    no_image = _la_case(tmp_path, "noimage", datasets=("label",))
    _fails([_entry(no_image, labeled=False)], rf"{no_image}: missing h5 dataset\(s\) \['image'\]")


def test_shape_problems(tmp_path):
    flat = _la_case(tmp_path, "flat", image=np.zeros((12, 10), np.float32), label=np.zeros((12, 10), np.uint8))
    _fails([_entry(flat)], f"{flat}: image has shape \\(12, 10\\), expected a 3D volume")
    four = _la_case(tmp_path, "four", image=np.zeros((2, *SHAPE), np.float32), label=np.zeros((2, *SHAPE), np.uint8))
    _fails([_entry(four)], f"{four}: image has shape")
    mismatch = _la_case(tmp_path, "mismatch", label=np.zeros((12, 10, 7), np.uint8))
    _fails([_entry(mismatch)], f"{mismatch}: label shape \\(12, 10, 7\\) differs from image shape \\(12, 10, 8\\)")
    # metadata-only mode still catches shapes
    _fails([_entry(mismatch)], "differs", check_values=False)


def test_value_problems(tmp_path):
    bad_label = np.zeros(SHAPE, np.uint8)
    bad_label[0, 0, 0], bad_label[1, 1, 1] = 1, 3
    three = _la_case(tmp_path, "three", label=bad_label)
    message = _fails([_entry(three)], f"{three}: label values \\[3\\] outside the integers \\[0, 2\\)")
    assert "num_classes=2" in message
    validate_cases([_entry(three)], num_classes=4)

    image = np.zeros(SHAPE, np.float32)
    image[0, 0, 0], image[1, 0, 0], image[2, 0, 0] = np.nan, np.inf, -np.inf
    nan = _la_case(tmp_path, "nan", image=image)
    _fails([_entry(nan)], f"{nan}: image contains 1 NaN and 2 Inf voxels")
    validate_cases([_entry(nan)], check_values=False)  # values are only read on request
    flat = _la_case(tmp_path, "flat", image=np.full(SHAPE, 2.0, np.float32))
    _fails([_entry(flat)], f"{flat}: image is constant \\(every voxel is 2.0\\)")

    frac = tmp_path / "frac.nii.gz"
    nib.save(nib.Nifti1Image(np.full(SHAPE, 0.5, np.float32), np.eye(4)), str(frac))
    img = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(size=SHAPE).astype(np.float32), np.eye(4)), str(img))
    _fails([{"image": str(img), "label": str(frac)}], f"{frac}: label values \\[0.5\\]")
    neg = tmp_path / "neg.nii.gz"
    nib.save(nib.Nifti1Image(np.full(SHAPE, -1, np.int16), np.eye(4)), str(neg))
    _fails([{"image": str(img), "label": str(neg)}], f"{neg}: label values \\[-1\\]")


def test_empty_label_warns_and_all_problems_reported(tmp_path):
    empty = _la_case(tmp_path, "emptycase", label=np.zeros(SHAPE, np.uint8))
    with pytest.warns(UserWarning, match="labeled case 'emptycase'"):
        info = validate_cases([_entry(empty)])
    assert info[0]["foreground_fraction"] == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate_cases([_entry(empty, labeled=False)])  # unlabeled: label never read
    good = _la_case(tmp_path, "good")
    bad1 = _la_case(tmp_path, "bad1", label=np.full(SHAPE, 7, np.uint8))
    bad2 = _la_case(tmp_path, "bad2", datasets=("image",))
    message = _fails([_entry(good), _entry(bad1), _entry(bad2)], "2 of 3 cases failed validation")
    assert str(bad1) in message and str(bad2) in message and str(good) not in message


def _one_line(message: str) -> str:
    return " ".join(message.split())  # as the command line prints it


def test_messages_read_as_separate_clauses(tmp_path):
    """On one line, each problem and the closing 'expected ...' are separated (never 'does not exist expected')."""
    missing, bad = tmp_path / "a.h5", _la_case(tmp_path, "bad", datasets=("image",))
    message = _one_line(_fails([_entry(missing), _entry(bad)], "2 of 2 cases failed validation"))
    assert f"{missing}: file does not exist; {bad}: missing h5 dataset(s) ['label']" in message
    assert "; expected: 3D 'image' (float, finite) and 'label' (integers in [0, num_classes))" in message
    root = tmp_path / "LA"
    _la_case(root, "ok")
    (root / "train.list").write_text("ok\nnofolder\n")
    with pytest.raises(DataError) as info:
        la_datalist(root)
    assert "'nofolder'); expected layout: <dataset_dir>/2018LA_Seg_Training Set" in _one_line(str(info.value))


def test_images_to_segment_are_described_without_labels(tmp_path):
    """A datalist without labels (inference) is checked as images: the message describes an image file."""
    missing = tmp_path / "scan.nii.gz"
    message = _one_line(_fails([{"image": str(missing)}], "1 of 1 cases failed validation"))
    assert message.endswith(
        f"{missing}: file does not exist; expected: one 3D image (float, finite) per case to segment: a NIfTI (.nii, "
        ".nii.gz), NRRD (.nrrd) or h5 file (dataset 'image')"
    )
    with pytest.raises(DataError) as info:
        inference_cases(CaseSplits(tmp_path / "nope", layout="la"))
    message = str(info.value)
    assert "pass the folder of the images to segment with --dataset_dir <folder>, or the image files" in message
    assert "(h5 with a 3D dataset 'image')" in message and "'label'" not in message
