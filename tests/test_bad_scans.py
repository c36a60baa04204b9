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
