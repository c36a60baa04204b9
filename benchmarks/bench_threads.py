"""Torch CPU threads for sliding-window evaluation: seconds per case at each thread count, side by side.

Run by hand (not a test), from the repository root, e.g. pinned to one core of a busy machine:

    taskset -c 1 python benchmarks/bench_threads.py --dataset_dir data/LA_half --threads 1 2

Runs the CPU protocol's evaluation step (``bundles/la/configs/cpu.yaml``: CS ``VNet(n_filters=8)`` with HF-Mamba,
seeded random init, patch 48x48x32, stride 24x24x16) with ``predict_volume`` on the largest case of
``<dataset_dir>/train.list``, alternating the thread counts ``--repeats`` times; prints each run, the 1-minute load
average before and after, the median seconds per thread count and their ratio to the first count.
"""

from __future__ import annotations

import argparse
import statistics
import time

import h5py
import numpy as np
import torch

from diffcl_algo.data import la_datalist
from diffcl_algo.inference.predict import predict_volume
from diffcl_algo.networks import VNet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset_dir", default="data/LA_half", help="an LA h5 dataset (train.list)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts to compare")
    parser.add_argument("--repeats", type=int, default=3, help="runs per thread count (alternating)")
    args = parser.parse_args()

    cases, _ = la_datalist(args.dataset_dir)
    sizes = []
    for case in cases:
        with h5py.File(case["image"]) as f:
            sizes.append((int(np.prod(f["image"].shape)), case["image"]))
    with h5py.File(max(sizes)[1]) as f:
        image = torch.as_tensor(f["image"][()])[None]
    torch.manual_seed(0)
    net = VNet(spatial_dims=3, in_channels=1, out_channels=2, n_filters=8, hfm_stages=(5,)).eval()
    load = open("/proc/loadavg").read().split()[0]
    print(f"case {max(sizes)[1]} shape {tuple(image.shape[1:])}; load average {load}")
    seconds: dict[int, list[float]] = {n: [] for n in args.threads}
    for repeat in range(args.repeats):
        for n in args.threads:
            torch.set_num_threads(n)
            start = time.perf_counter()
            predict_volume(net, image, (48, 48, 32), (24, 24, 16))
            seconds[n].append(time.perf_counter() - start)
            print(f"run {repeat} threads {n}: {seconds[n][-1]:.2f} s")
    first = statistics.median(seconds[args.threads[0]])
    print(f"load average after: {open('/proc/loadavg').read().split()[0]}")
    for n, values in seconds.items():
        median = statistics.median(values)
        print(f"threads {n}: median {median:.2f} s per case ({median / first:.2f}x threads {args.threads[0]})")


if __name__ == "__main__":
    main()
