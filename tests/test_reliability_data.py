"""Reliability: bad data stops ``train`` with a ``DataError`` naming the file and the problem before any training
step, leaving no ``model.pt`` / ``train_state.pt``; an empty label warns; a volume smaller than the patch is padded
(docs/reliability.md, item 2)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Callable

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
from tiny_settings import TINY_TRAIN

from diffcl_algo.bundle.run import train
from diffcl_algo.convert import make_synthetic_dataset
from diffcl_algo.data import DataError, validate_cases

TINY = TINY_TRAIN
SHAPE = (20, 20, 18)
CASE = "synth_la_000"  # first training case: labeled


def _dataset(root: Path, shape=SHAPE) -> Path:
    return make_synthetic_dataset(root / "la", num_cases=5, shape=shape, seed=0, num_test=1)


def _h5(root: Path, case: str = CASE) -> Path:
    return root / "2018LA_Seg_Training Set" / case / "mri_norm2.h5"


def _rewrite(path: Path, image: np.ndarray | None = None, label: np.ndarray | None = None) -> None:
    with h5py.File(path, "r") as f:
        old_image, old_label = f["image"][()], f["label"][()]
    with h5py.File(path, "w") as f:
        f.create_dataset("image", data=old_image if image is None else image)
        f.create_dataset("label", data=old_label if label is None else label)


def _garbage(path: Path) -> None:
    path.write_bytes(b"this is not an HDF5 file" * 10)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _nan(path: Path) -> None:
    image = np.zeros(SHAPE, np.float32)
    image[0, 0, :3] = np.nan
    image[1, 1, 1] = np.inf
    _rewrite(path, image=image)


def _label_value(path: Path) -> None:
    label = np.zeros(SHAPE, np.uint8)
    label[5:9, 5:9, 5:9] = 1
    label[0, 0, 0] = 2
    _rewrite(path, label=label)


# name -> (break the dataset at root; returns the dataset_dir to use), expected message fragments (format: root, case)
BAD_DATA: dict[str, tuple[Callable[[Path], Path], list[str]]] = {
    "missing dataset dir": (lambda root: root / "nope", ["dataset directory {root}/nope does not exist"]),
    "missing case list": (
        lambda root: (root / "train.list").unlink() or root,
        ["case list {root}/train.list does not exist"],
    ),
    "missing case": (
        lambda root: (root / "train.list").write_text("synth_la_000\nsynth_la_001\nghost\nsynth_la_002\n") and root,
        ["case folder {root}/2018LA_Seg_Training Set/ghost is missing (case 'ghost')"],
    ),
    "corrupt h5": (
        lambda root: _garbage(_h5(root)) or root,
        ["{h5}: cannot be read, the file is corrupt or truncated"],
    ),
    "truncated h5": (
        lambda root: _truncate(_h5(root)) or root,
        ["{h5}: cannot be read, the file is corrupt or truncated"],
    ),
    "image not 3D": (
        lambda root: _rewrite(_h5(root), image=np.zeros((2, *SHAPE), np.float32)) or root,
        ["{h5}: image has shape (2, 20, 20, 18), expected a 3D volume (X, Y, Z)"],
    ),
    "shape mismatch": (
        lambda root: _rewrite(_h5(root), label=np.zeros((20, 20, 16), np.uint8)) or root,
        ["{h5}: label shape (20, 20, 16) differs from image shape (20, 20, 18)"],
    ),
    "label out of range": (
        lambda root: _label_value(_h5(root)) or root,
        ["{h5}: label values [2] outside the integers [0, 2) (num_classes=2)"],
    ),
    "NaN/Inf in image": (lambda root: _nan(_h5(root)) or root, ["{h5}: image contains 3 NaN and 1 Inf voxels"]),
}


def _assert_no_training_output(out: Path) -> None:
    for name in ("model.pt", "train_state.pt"):
        assert not (out / name).exists(), f"{name} written despite bad data"


@pytest.mark.parametrize("kind", list(BAD_DATA))
def test_bad_data_stops_train_before_any_step(kind, tmp_path, monkeypatch):
    root = _dataset(tmp_path)
    dataset_dir = BAD_DATA[kind][0](root)
    steps = []
    monkeypatch.setattr("diffcl_algo.training.trainer.DiffCLTrainer._iteration", lambda *a: steps.append(a))
    out = tmp_path / "run"
    with pytest.raises(DataError) as info:
        train(dataset_dir=str(dataset_dir), output_dir=str(out), **TINY)
    message = str(info.value)
    for fragment in BAD_DATA[kind][1]:
        assert fragment.format(root=root, h5=_h5(root)) in message, message
    assert not steps, "a training step ran"
    _assert_no_training_output(out)


def _nifti_dataset(root: Path, n: int = 4) -> list[dict]:
    rng = np.random.default_rng(0)
    entries = []
    for i in range(n):
        label = np.zeros(SHAPE, np.uint8)
        label[5:12, 6:13, 4:10] = 1
        image = (rng.standard_normal(SHAPE) + label).astype(np.float32)
        paths = {key: root / f"case{i}_{key}.nii.gz" for key in ("image", "label")}
        nib.save(nib.Nifti1Image(image, np.eye(4)), paths["image"])
        nib.save(nib.Nifti1Image(label, np.eye(4)), paths["label"])
        entries.append({k: str(p) for k, p in paths.items()})
    return entries


@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
def test_bad_nifti_stops_train(damage, tmp_path):
    entries = _nifti_dataset(tmp_path)
    bad = Path(entries[1]["image"])
    _garbage(bad) if damage == "corrupt" else _truncate(bad)
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": entries}))
    out = tmp_path / "run"
    with pytest.raises(DataError, match="cannot be read, the file is corrupt or truncated") as info:
        train(dataset_dir=str(tmp_path), datalist=str(datalist), output_dir=str(out), **TINY)
    assert f"{bad}: cannot be read" in str(info.value)
    _assert_no_training_output(out)


def test_every_problem_is_reported_at_once(tmp_path):
    root = _dataset(tmp_path)
    _garbage(_h5(root, "synth_la_000"))
    _nan(_h5(root, "synth_la_002"))
    with pytest.raises(DataError, match="2 of 4 cases failed validation") as info:
        train(dataset_dir=str(root), output_dir=str(tmp_path / "run"), **TINY)
    assert str(_h5(root, "synth_la_000")) in str(info.value) and str(_h5(root, "synth_la_002")) in str(info.value)


def test_empty_label_of_a_labeled_case_warns(tmp_path):
    root = _dataset(tmp_path)
    _rewrite(_h5(root), label=np.zeros(SHAPE, np.uint8))
    message = f"labeled case '{CASE}': label {_h5(root)} is empty (no foreground voxel)"
    with pytest.warns(UserWarning, match="is empty") as record:
        validate_cases([{"image": str(_h5(root)), "label": str(_h5(root)), "case": CASE}])
    assert str(record[0].message) == message
    with pytest.warns(UserWarning, match="is empty"):  # a warning, not an error: training runs
        train(dataset_dir=str(root), output_dir=str(tmp_path / "run"), **TINY)
    assert (tmp_path / "run" / "model.pt").exists()


def test_unlabeled_case_with_empty_label_does_not_warn(tmp_path):
    root = _dataset(tmp_path)
    _rewrite(_h5(root, "synth_la_003"), label=np.zeros(SHAPE, np.uint8))  # beyond num_labeled=2: label unused
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*is empty")
        train(dataset_dir=str(root), output_dir=str(tmp_path / "run"), **TINY)


def test_volume_smaller_than_patch_is_padded(tmp_path):
    """Training zero-pads volumes smaller than the patch (SpatialPadd, as the field's RandomCrop); so does the
    sliding-window validation. The model keeps the patch size; predictions keep the volume size."""
    root = _dataset(tmp_path, shape=(12, 14, 10))
    out = tmp_path / "run"
    summary = train(dataset_dir=str(root), output_dir=str(out), **{**TINY, "max_iterations": 2, "val_interval": 2})
    assert summary["iteration"] == 2 and summary["best_iteration"] == 2
    state = torch.load(out / "model.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
