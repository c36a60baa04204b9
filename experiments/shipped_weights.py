"""Score the LA bundle's shipped weights as a user meets them: scans in, masks on the scans' own grid, medpy metrics.

Each report case (cases that the weights never trained or were selected on) is written as a NIfTI scan at the h5
files' 0.625 mm voxels, segmented by the bundle's inference command without ``--ckpt_path`` (so with
``bundles/la/models/model.pt``), and its mask scored against the label at full resolution::

    python experiments/shipped_weights.py --src ../shared/data/LA
    python experiments/shipped_weights.py --tta_flip false --work runs/shipped_one_pass  # without flip TTA
    python experiments/shipped_weights.py --ckpt_path runs/x/model.pt --work runs/x_scans  # other weights, same network
    python experiments/shipped_weights.py --split selection --work runs/sel  # the 8 selection cases: choose options

Writes ``<work>/scores.json`` and prints the per-case table of ``bundles/la/docs/README.md``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import fire
import h5py
import nibabel as nib
import numpy as np

from diffcl_algo.data.io import read_case_list
from diffcl_algo.evaluation.metrics import case_metrics
from diffcl_algo.utils import as_bool

REPO = Path(__file__).resolve().parents[1]
INFERENCE = REPO / "bundles/la/configs/inference.yaml"
LA_SPACING = (0.625, 0.625, 0.625)
METRICS = ("dice", "jaccard", "hd95", "asd")


def write_scan(h5_file: Path, folder: Path) -> tuple[Path, np.ndarray]:
    """``<folder>/<case>.nii.gz`` of an h5 case's image (0.625 mm diagonal affine); returns it and the label."""
    with h5py.File(h5_file, "r") as f:
        image, label = f["image"][()], f["label"][()]
    scan = folder / f"{h5_file.parent.name}.nii.gz"
    nib.save(nib.Nifti1Image(image.astype(np.float32), np.diag([*LA_SPACING, 1.0])), scan)
    return scan, label


def split_cases(listed: list[str], report: int = 16, split: str = "report") -> list[str]:
    """Fold 0's ``report`` cases of the CPU protocol (the last ``report`` of ``train.list``) or its 8 ``selection``
    cases (the 8 before them, ``cpu.yaml``'s ``num_val_holdout``)."""
    if split == "report":
        return listed[-report:]
    if split == "selection":
        return listed[-report - 8 : -report]
    raise ValueError(f"split must be 'report' or 'selection', not {split!r}")


def segment(scans: list[Path], output_dir: Path, options: dict[str, str]) -> None:
    """The README's command: ``python -m diffcl_algo run inferring --config_file ... --images [...]``, plus
    ``--<id> <value>`` for each of ``options``."""
    images = "[" + ",".join(f"'{s}'" for s in scans) + "]"
    cmd = [sys.executable, "-m", "diffcl_algo", "run", "inferring", "--config_file", str(INFERENCE),
           "--images", images, "--output_dir", str(output_dir)]  # fmt: skip
    for key, value in options.items():
        cmd += [f"--{key}", value]
    subprocess.run(cmd, check=True)


def score(
    src: str = "../shared/data/LA",
    report: int = 16,
    split: str = "report",
    work: str = "runs/shipped_weights",
    keep_largest: bool | None = None,
    tta_flip: bool | None = None,
    ckpt_path: str = "",
) -> None:
    """Segment the last ``report`` cases of ``<src>/train.list`` (the CPU protocol's report split, fold 0), or with
    ``split="selection"`` the 8 cases before them (fold 0's selection cases, where inference options are chosen), score
    them and write ``<work>/scores.json`` (``{"cases": {case: metrics}, "mean": metrics, "seconds": s}``);
    ``keep_largest``: the bundle's ``keep_largest_component`` (False: the masks as the network gives them);
    ``tta_flip``: the bundle's flip test-time augmentation (each None: the bundle's default); ``ckpt_path``: weights
    other than the shipped ones (the bundle's network)."""
    root, out = Path(src), Path(work)
    (out / "scans").mkdir(parents=True, exist_ok=True)
    cases = split_cases(read_case_list(root / "train.list"), report, split)
    labels, scans = {}, []
    for case in cases:
        scan, labels[case] = write_scan(root / "2018LA_Seg_Training Set" / case / "mri_norm2.h5", out / "scans")
        scans.append(scan)
    given = {"keep_largest_component": keep_largest, "tta_flip": tta_flip}
    options = {k: str(as_bool(v)).lower() for k, v in given.items() if v is not None}
    if ckpt_path:
        options["ckpt_path"] = str(Path(ckpt_path).resolve())
    start = time.perf_counter()
    segment(scans, out / "masks", options)
    seconds = time.perf_counter() - start
    per_case = {}
    for case in cases:
        mask = np.asarray(nib.load(out / "masks" / f"{case}.nii.gz").dataobj)
        per_case[case] = case_metrics(mask, labels[case], LA_SPACING)
    mean = {m: float(np.mean([v[m] for v in per_case.values()])) for m in METRICS}
    result = {"cases": per_case, "mean": mean, "seconds": seconds}
    (out / "scores.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["| case | Dice | Jaccard | 95HD (mm) | ASD (mm) |", "|---|---|---|---|---|"]
    for case, v in [*per_case.items(), ("**mean**", mean)]:
        lines.append(f"| {case} | {v['dice']:.4f} | {v['jaccard']:.4f} | {v['hd95']:.2f} | {v['asd']:.2f} |")
    print("\n".join(lines))
    print(f"inference command: {seconds:.0f} s for {len(cases)} scans")


if __name__ == "__main__":
    fire.Fire(score)
