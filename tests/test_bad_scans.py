"""Bad scans through the inference command: one line naming the file and the problem, and no mask written at all.

As a user runs it (``python -m diffcl_algo run inferring --images ...``, in-process through the CLI's ``main``): a
good scan listed first is not segmented either, because every input is checked before the first one is.
"""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from diffcl_algo.bundle.run import load_bundle
from diffcl_algo.cli import main
from diffcl_algo.networks import VNet

LA = Path(__file__).resolve().parents[1] / "bundles" / "la" / "configs"
GOOD = np.random.default_rng(0).normal(size=(32, 32, 32)).astype(np.float32)


def _bad(kind: str) -> np.ndarray | None:
    if kind == "4D":
        return np.stack([GOOD, GOOD], axis=-1)
    if kind in ("NaN", "Inf"):
        array = GOOD.copy()
        array[3, 4, 5] = np.nan if kind == "NaN" else np.inf
        return array
    if kind == "constant":
        return np.full_like(GOOD, 7.0)
    if kind == "2D":
        return GOOD[:, :, 0]
    return None  # empty file


EXPECTED = {
    "4D": r"image has shape \(32, 32, 32, 2\), expected a 3D volume",
    "NaN": "image contains 1 NaN and 0 Inf voxels",
    "Inf": "image contains 0 NaN and 1 Inf voxels",
    "constant": r"image is constant \(every voxel is 7.0\)",
    "2D": r"image has shape \(32, 32\), expected a 3D volume",
    "empty": "cannot be read, the file is corrupt or truncated",
}


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_bad_scan_is_one_line_and_writes_no_mask(kind, tmp_path, capsys):
    good, bad = tmp_path / "good.nii.gz", tmp_path / f"bad_{kind}.nii.gz"
    nib.save(nib.Nifti1Image(GOOD, np.eye(4)), good)
    array = _bad(kind)
    if array is None:
        bad.write_bytes(b"")
    else:
        nib.save(nib.Nifti1Image(array, np.eye(4)), bad)
    ckpt = tmp_path / "model.pt"
    torch.save(VNet(3, 1, 2, n_filters=4).state_dict(), ckpt)
    out = tmp_path / "masks"
    code = main(["run", "inferring", "--config_file", str(LA / "inference.yaml"), "--images", f"['{good}', '{bad}']",
                 "--ckpt_path", str(ckpt), "--n_filters", "4", "--output_dir", str(out)])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("error: 1 of 2 cases failed validation: ") and f"{bad}: " in err[-1]
    assert re.search(EXPECTED[kind], err[-1]), err[-1]
    assert not out.exists()  # nothing written, not even the good scan's mask


def test_missing_scan_speaks_of_images_to_segment(tmp_path, capsys):
    """Inference input is images: the error says what an image to segment must be (no label), in separate clauses."""
    missing = tmp_path / "nope.nii.gz"
    code = main(["run", "inferring", "--config_file", str(LA / "inference.yaml"), "--images", f"['{missing}']",
                 "--output_dir", str(tmp_path / "masks")])  # fmt: skip
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1
    assert last == (
        f"error: 1 of 1 cases failed validation: {missing}: file does not exist; expected: one 3D image (float, "
        "finite) per case to segment: a NIfTI (.nii, .nii.gz), NRRD (.nrrd) or h5 file (dataset 'image')"
    )


def test_missing_image_folder_speaks_of_images_to_segment(tmp_path, capsys):
    folder = tmp_path / "scans"
    code = main(["run", "inferring", "--config_file", str(LA / "inference.yaml"), "--dataset_dir", str(folder),
                 "--output_dir", str(tmp_path / "masks")])  # fmt: skip
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1
    assert last.startswith(
        f"error: dataset directory {folder} does not exist; pass the folder of the images to segment with "
        "--dataset_dir <folder>, or the image files (NIfTI, NRRD or h5) with --images"
    )
    assert "'label'" not in last and "(h5 with a 3D dataset 'image')" in last


def test_inference_names_each_written_mask(tmp_path, capsys):
    scans = [tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"]
    for scan in scans:
        nib.save(nib.Nifti1Image(GOOD, np.eye(4)), scan)
    ckpt = tmp_path / "model.pt"
    net = load_bundle(LA.parent, "inference", n_filters=4, use_hfm=False).get_parsed_content("network_def")
    torch.save(net.state_dict(), ckpt)
    out = tmp_path / "masks"
    images = str([str(s) for s in scans])
    code = main(["run", "inferring", "--config_file", str(LA / "inference.yaml"), "--images", images,
                 "--ckpt_path", str(ckpt), "--n_filters", "4", "--use_hfm", "false", "--patch_size", "[32, 32, 32]",
                 "--strides", "[16, 16, 16]", "--output_dir", str(out)])  # fmt: skip
    printed = capsys.readouterr().out.splitlines()
    assert code == 0
    for case in ("a", "b"):
        assert (out / f"{case}.nii.gz").is_file()
        assert any(line.endswith(f"inference: mask of case {case} written to {out / case}.nii.gz") for line in printed)
    assert any(line.endswith(f"inference: 2 masks written to {out}") for line in printed)
