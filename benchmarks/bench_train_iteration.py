"""One Diff-CL training iteration vs one supervised-only iteration at the same patch, side by side.

Run by hand (not a test), from the repository root:

    python benchmarks/bench_train_iteration.py --device cpu --patch 48 48 32 --n_filters 8 --profile 15
    python benchmarks/bench_train_iteration.py --device cuda --patch 112 112 80 --amp none bfloat16

Prints, per configuration (the four rows of Table 6), the median seconds of ``DiffCLTrainer._iteration`` on a fixed
random batch (2 labeled + 2 unlabeled, after warm-up), the overhead ratio full / supervised-only and, on CUDA, the peak
GPU memory of each configuration (``torch.cuda.max_memory_allocated``, reset between configurations). The
supervised-only row trains the CS alone (one V-Net on the labeled images). ``--profile N`` also prints the N
operators with the most self time over two full Diff-CL iterations (``torch.profiler``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from diffcl_algo.bundle.run import load_bundle
from diffcl_algo.training.trainer import DiffCLTrainer

MODES = {  # the four rows of Table 6, so the overhead splits into its parts
    "supervised-only": dict(use_cps=False, use_hfm=False, use_cl=False),
    "+ CPS": dict(use_cps=True, use_hfm=False, use_cl=False),
    "+ CPS + HFM": dict(use_cps=True, use_hfm=True, use_cl=False),
    "full Diff-CL": dict(use_cps=True, use_hfm=True, use_cl=True),
}


def make_trainer(mode: dict, args: argparse.Namespace, device: torch.device, amp: str) -> DiffCLTrainer:
    """The networks, optimizers and weights of the LA 8/72 training graph (no data), in a trainer of one batch."""
    torch.manual_seed(0)
    graph = load_bundle("la", n_filters=args.n_filters, device=str(device), channels_last=args.channels_last, **mode)
    net = graph.get_parsed_content
    return DiffCLTrainer(
        device=device,
        max_iterations=1000,
        train_data_loader=[None],
        epoch_length=36,
        cs_network=net("network"),
        ds_network=net("nets#ds_network"),
        contrastive=net("nets#contrastive"),
        hyperparams=net("common#hp"),
        use_cps=mode["use_cps"],
        cs_optimizer=net("nets#cs_optimizer"),
        ds_optimizer=net("nets#ds_optimizer"),
        amp=False if amp == "none" else amp,
    )


def make_batch(args: argparse.Namespace) -> dict:
    """A fixed random batch of 2 labeled + 2 unlabeled images, a box as the label."""
    g = torch.Generator().manual_seed(0)
    image = torch.randn(4, 1, *args.patch, generator=g)
    label = torch.zeros(2, 1, *args.patch)
    c = [s // 2 for s in args.patch]
    label[:, :, c[0] - c[0] // 2 : c[0] + c[0] // 2, c[1] - c[1] // 2 : c[1] + c[1] // 2, :] = 1
    return {"image": image, "label": label}


def time_mode(
    mode: dict, args: argparse.Namespace, device: torch.device, amp: str, compile: bool = False
) -> tuple[float, float]:
    trainer = make_trainer(mode, args, device, amp)
    if compile:  # in place (nn.Module.compile): the trainer, its EMA and optimizers keep the same modules
        for net in (trainer.cs_network, trainer.ds_network):
            net.compile()
    batch = make_batch(args)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for k in range(args.warmup + args.iters):
        trainer.state.iteration = k + 1
        t0 = time.perf_counter()
        trainer._iteration(trainer, batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if k >= args.warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return statistics.median(times), peak


def profile_full(args: argparse.Namespace, device: torch.device, rows: int) -> None:
    """Top operators by self time of two full Diff-CL iterations (after the benchmark's warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    trainer = make_trainer(MODES["full Diff-CL"], args, device, "none")
    batch = make_batch(args)
    for k in range(args.warmup):
        trainer.state.iteration = k + 1
        trainer._iteration(trainer, batch)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for k in range(args.warmup, args.warmup + 2):
            trainer.state.iteration = k + 1
            trainer._iteration(trainer, batch)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=40))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--patch", type=int, nargs=3, default=[112, 112, 80])
    parser.add_argument("--n_filters", type=int, default=16)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--amp", nargs="+", default=["none"], choices=["none", "bfloat16", "float16"])
    parser.add_argument("--profile", type=int, default=0, help="print the top N operators of a full iteration")
    parser.add_argument("--channels_last", action="store_true", help="V-Nets in channels-last memory order")
    parser.add_argument("--compile", action="store_true", help="also time each mode with the CS and DS compiled")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES), metavar="MODE")
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    layout = "channels-last" if args.channels_last else "contiguous"
    print(f"torch {torch.__version__}, {name}, patch {tuple(args.patch)}, n_filters {args.n_filters}, 2+2, {layout}")
    header = f"{'precision':>10} {'mode':>16} {'s/iter':>8} {'peak GiB':>9}"
    print(header + (f" {'compiled':>9} {'speed-up':>9}" if args.compile else ""))
    for amp in args.amp:
        results = {}
        for label in args.modes:
            results[label] = time_mode(MODES[label], args, device, amp)
            line = f"{amp:>10} {label:>16} {results[label][0]:8.3f} {results[label][1]:9.2f}"
            if args.compile:  # side by side: the same mode, then compiled
                compiled = time_mode(MODES[label], args, device, amp, compile=True)[0]
                line += f" {compiled:9.3f} {results[label][0] / compiled:8.2f}x"
            print(line, flush=True)
        if {"full Diff-CL", "supervised-only"} <= set(results):
            ratio = results["full Diff-CL"][0] / results["supervised-only"][0]
            print(f"{amp:>10} overhead full / supervised-only = {ratio:.2f}x")
    if args.profile:
        profile_full(args, device, args.profile)


if __name__ == "__main__":
    main()
