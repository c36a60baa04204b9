"""Train / val transform chains: patch-sized tensors, padding, the field's RandomRotFlip law, batching."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset

from diffcl_algo.convert import make_synthetic_dataset
from diffcl_algo.data import RandRotFlipd, build_datalists, train_transforms, val_transforms

LA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "LA"


def _case(path: Path, shape) -> dict:
    """h5 case whose image equals its label plus a coordinate ramp, so crops can be matched."""
    label = np.zeros(shape, np.uint8)
    label[tuple(slice(s // 4, s // 2) for s in shape)] = 1
    ramp = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) + 1
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("image", data=ramp * (1 + label))
        f.create_dataset("label", data=label)
    return {"image": str(path), "label": str(path)}


def test_train_transforms_patch_and_alignment(tmp_path):
    entry = _case(tmp_path / "a.h5", (40, 36, 20))
    tr = train_transforms((24, 24, 16))
    tr.set_random_state(0)
    for _ in range(5):
        out = tr(entry)
        image, label = out["image"], out["label"]
        assert image.shape == label.shape == (1, 24, 24, 16)
        assert image.dtype == label.dtype == torch.float32
        # image and label went through the same crop / rotation / flip: image = ramp * (1 + label)
        ramp = torch.where(label > 0, image / 2, image)
        assert torch.unique(ramp).numel() == ramp.numel() > 0


def test_train_transforms_pad_small_volume_and_unlabeled(tmp_path):
    entry = _case(tmp_path / "small.h5", (10, 14, 6))
    out = train_transforms((16, 20, 8))(entry)
    assert out["image"].shape == out["label"].shape == (1, 16, 20, 8)
    # the whole volume fits in the padded patch: every voxel survives, padding is 0
    assert int(out["label"].sum()) == int(np.prod([10 // 2 - 10 // 4, 14 // 2 - 14 // 4, 6 // 2 - 6 // 4]))
    assert int((out["image"] != 0).sum()) == 10 * 14 * 6
    unl = train_transforms((16, 20, 8), labeled=False)({"image": entry["image"]})
    assert set(unl) == {"image"} and unl["image"].shape == (1, 16, 20, 8)


def test_rand_rot_flip_is_the_fields_law():
    """Rot90 (k uniform in 0..3) then flip of axis 0 or 1 = the 4 in-plane reflections, uniformly; z untouched."""
    x = torch.arange(3 * 3 * 2, dtype=torch.float32).reshape(1, 3, 3, 2)
    t = RandRotFlipd("image")
    t.set_random_state(1)
    reflections = [torch.flip(torch.rot90(x, k, (1, 2)), (1,)) for k in range(4)]
    counts = np.zeros(4)
    for _ in range(400):
        y = t({"image": x})["image"]
        match = [i for i, r in enumerate(reflections) if torch.equal(y.as_tensor(), r)]
        assert len(match) == 1
        counts[match[0]] += 1
    assert counts.min() > 70  # ~100 each
    inv = t.inverse(t({"image": x.clone()}))["image"]
    assert torch.equal(inv.as_tensor(), x)


def test_val_transforms_and_batching(tmp_path):
    root = make_synthetic_dataset(tmp_path / "LA", num_cases=4, shape=(32, 28, 20), num_test=1)
    labeled, unlabeled = build_datalists(root, num_labeled=2)
    val = val_transforms()(labeled[0])
    assert val["image"].shape == val["label"].shape == (1, 32, 28, 20)
    loader = DataLoader(Dataset(labeled, train_transforms((16, 16, 16))), batch_size=2)
    batch = next(iter(loader))
    assert batch["image"].shape == batch["label"].shape == (2, 1, 16, 16, 16)
    assert set(torch.unique(batch["label"]).tolist()) <= {0.0, 1.0}
    loader = DataLoader(Dataset(unlabeled, train_transforms((16, 16, 16), labeled=False)), batch_size=1)
    assert next(iter(loader))["image"].shape == (1, 1, 16, 16, 16)


@pytest.mark.skipif(not LA_DIR.is_dir(), reason=f"real LA data not at {LA_DIR}")
def test_real_la_patch():
    labeled, _ = build_datalists(LA_DIR, num_labeled=1)
    out = train_transforms((112, 112, 80))(labeled[0])
    assert out["image"].shape == out["label"].shape == (1, 112, 112, 80)
