"""Benchmark ``diffcl_algo.evaluation.metrics.case_metrics`` against medpy's dc + jc + hd95 + asd on real LA labels.

Run by hand from the repository root (needs medpy, h5py and the LA data in ``../shared/data/LA``)::

    python benchmarks/bench_metrics.py [--cases 5] [--repeat 3] [--spacing 0.625 0.625 0.625]

The prediction is the label dilated by ``--dilate`` voxels and shifted by ``--shift`` voxels (zero fill). Reported
times are the minimum over ``--repeat`` runs per case (the machine may be shared).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import h5py
import numpy as np
from medpy.metric import binary as medpy_binary
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diffcl_algo.evaluation.metrics import METRIC_NAMES, case_metrics  # noqa: E402

LA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "LA"


def medpy_metrics(pred: np.ndarray, label: np.ndarray, spacing) -> dict[str, float]:
    return {
        "dice": medpy_binary.dc(pred, label),
        "jaccard": medpy_binary.jc(pred, label),
        "hd95": medpy_binary.hd95(pred, label, voxelspacing=spacing),
        "asd": medpy_binary.asd(pred, label, voxelspacing=spacing),
    }


def best_time(fn, repeat: int, *args) -> tuple[float, dict[str, float]]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn(*args)
        times.append(time.perf_counter() - start)
    return min(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=LA_DIR)
    parser.add_argument("--cases", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dilate", type=int, default=2)
    parser.add_argument("--shift", type=int, nargs=3, default=(3, -2, 1))
    parser.add_argument("--spacing", type=float, nargs="+", default=None)
    args = parser.parse_args()

    names = (args.data / "train.list").read_text().split()[: args.cases]
    print(f"spacing={args.spacing} dilate={args.dilate} shift={tuple(args.shift)} repeat={args.repeat} (min time)")
    print(f"{'case':22s} {'shape':16s} {'medpy s':>9s} {'ours s':>8s} {'ratio':>6s} {'max|diff|':>10s}  metrics (ours)")
    total_medpy = total_ours = 0.0
    worst = 0.0
    for name in names:
        with h5py.File(args.data / "2018LA_Seg_Training Set" / name / "mri_norm2.h5", "r") as f:
            label = f["label"][:]
        pred = ndi.shift(ndi.binary_dilation(label, iterations=args.dilate).astype(np.uint8), args.shift, order=0)
        t_medpy, ref = best_time(medpy_metrics, args.repeat, pred, label, args.spacing)
        t_ours, ours = best_time(case_metrics, args.repeat, pred, label, args.spacing)
        diff = max(abs(float(ours[k]) - float(ref[k])) for k in METRIC_NAMES)
        worst = max(worst, diff)
        total_medpy += t_medpy
        total_ours += t_ours
        values = " ".join(f"{k}={ours[k]:.4f}" for k in METRIC_NAMES)
        shape = "x".join(map(str, label.shape))
        print(f"{name:22s} {shape:16s} {t_medpy:9.3f} {t_ours:8.3f} {t_medpy / t_ours:6.1f} {diff:10.3g}  {values}")
    print(f"{'total':22s} {'':16s} {total_medpy:9.3f} {total_ours:8.3f} {total_medpy / total_ours:6.1f} {worst:10.3g}")


if __name__ == "__main__":
    main()
