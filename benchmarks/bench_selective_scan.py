"""CPU benchmark of the portable selective scan against the sequential reference (run by hand, not a test).

    PYTHONPATH=. python benchmarks/bench_selective_scan.py [--threads N] [--repeats R]   # from the repo root

Prints, for batch 1, N = 16 and L in {1024, 4096}, dim in {64, 256}: seconds for the forward pass and for
forward + backward (best of ``repeats``), the speed-up over the sequential loop of eq. 4, and the largest
absolute differences of the output and of the input gradients between the two.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from diffcl_algo.networks.ssm import selective_scan, selective_scan_reference


def _inputs(batch: int, dim: int, n_state: int, length: int) -> list[torch.Tensor]:
    """Mamba-like inputs: u, delta (pre-softplus), A = -(1..N), B, C, D, z, delta_bias."""
    g = torch.Generator().manual_seed(0)
    u = torch.randn(batch, dim, length, generator=g)
    delta = torch.randn(batch, dim, length, generator=g) * 0.5
    a_mat = -torch.arange(1, n_state + 1, dtype=torch.float32).repeat(dim, 1)
    b_mat = torch.randn(batch, n_state, length, generator=g)
    c_mat = torch.randn(batch, n_state, length, generator=g)
    d_vec = torch.ones(dim)
    z = torch.randn(batch, dim, length, generator=g)
    delta_bias = torch.rand(dim, generator=g) * -4.0
    return [t.requires_grad_() for t in (u, delta, a_mat, b_mat, c_mat, d_vec, z, delta_bias)]


def _run(fn: Callable[..., torch.Tensor], args: list[torch.Tensor], backward: bool) -> tuple[torch.Tensor, list]:
    u, delta, a_mat, b_mat, c_mat, d_vec, z, delta_bias = args
    out = fn(u, delta, a_mat, b_mat, c_mat, d_vec, z=z, delta_bias=delta_bias, delta_softplus=True)
    if not backward:
        return out, []
    grads = torch.autograd.grad(out.square().sum(), args)
    return out, list(grads)


def _best_time(fn: Callable[..., torch.Tensor], args: list[torch.Tensor], backward: bool, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        if backward:
            _run(fn, args, True)
        else:
            with torch.no_grad():
                _run(fn, args, False)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (default 1: stable on a shared CPU; 0: torch's)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    opts = parser.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, batch 1, N 16, ", end="")
    print(f"best of {opts.repeats}; seconds")
    header = (
        f"{'L':>5} {'dim':>4} | {'fwd ours':>9} {'fwd ref':>8} {'ratio':>6} | {'f+b ours':>9} {'f+b ref':>8} "
        f"{'ratio':>6} | {'max|dy|':>8} {'max|dgrad|':>10} {'max|grad|':>9}"
    )
    print(header)
    print("-" * len(header))
    for length in (1024, 4096):
        for dim in (64, 256):
            args = _inputs(1, dim, 16, length)
            fwd = [_best_time(f, args, False, opts.repeats) for f in (selective_scan, selective_scan_reference)]
            fb = [_best_time(f, args, True, opts.repeats) for f in (selective_scan, selective_scan_reference)]
            out, grads = _run(selective_scan, args, True)
            out_ref, grads_ref = _run(selective_scan_reference, args, True)
            dy = (out - out_ref).abs().max().item()
            dg = max((g - r).abs().max().item() for g, r in zip(grads, grads_ref))
            gmax = max(r.abs().max().item() for r in grads_ref)
            print(
                f"{length:>5} {dim:>4} | {fwd[0]:>9.4f} {fwd[1]:>8.4f} {fwd[1] / fwd[0]:>5.1f}x | {fb[0]:>9.4f} "
                f"{fb[1]:>8.4f} {fb[1] / fb[0]:>5.1f}x | {dy:>8.1e} {dg:>10.1e} {gmax:>9.1e}"
            )


if __name__ == "__main__":
    main()
