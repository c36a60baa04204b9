"""End-to-end demo on synthetic data: Diff-CL vs. a supervised-only baseline, trained and evaluated with the bundles.

``python -m diffcl_algo demo [--output_dir demo_output] [--seed 0] [--iterations 300] [--quick] [--options
"{'ema_decay': 0.0}"]`` (or :func:`demo`) needs no data and no GPU:

1. writes a small deterministic synthetic dataset in the LA layout
   (:func:`diffcl_algo.convert.synthetic.make_shifted_dataset`: ``train.list`` = 3 labeled + 9 unlabeled + 2
   validation cases, ``test.list`` = 8 held-out test cases). It is a semi-supervised task with a distribution shift:
   the labeled cases all have a high foreground contrast (1.5, as if the clearest scans had been annotated first),
   while the unlabeled, validation and test cases come from the whole collection, their contrasts spread over
   0.8-1.5. Trained on the labeled cases alone, a network learns the contrast of those; the unlabeled cases carry the
   lower contrasts that the test cases have, which Diff-CL's pseudo-labels train on;
2. trains Diff-CL (CPS + HF-Mamba + contrastive label propagation, with the mean teacher) and the supervised-only
   baseline (``use_cps``/``use_hfm``/``use_cl`` false, paper Table 6 row 1) with the LA bundle's training workflow
   (:func:`diffcl_algo.bundle.run.run_workflow`: ``monai.bundle.ConfigWorkflow`` on the graph that
   ``bundles/la/configs/train.yaml`` is written from, the code path of ``python -m monai.bundle run training``)
   with small-scale overrides (volume, patch, width, iterations; the ramp and the mean teacher's ``ema_decay``
   scaled to the short run, and ``unsup_ramp``: the cross pseudo-supervision is warmed up with the ramp, so the
   first pseudo-labels, made by a network that has not learned yet, weigh little; without it, the paper as printed,
   Diff-CL falls behind on seed 0: 0.5642 against 0.6026); both models are the weight
   average of the same ``ema_decay``; validation on the last 2 training-list cases selects ``model.pt``;
3. evaluates both with the LA bundle's evaluation workflow on ``test.list`` (predictions, ``metrics.csv``,
   ``metrics_summary.json``), one sliding-window pass per case (``tta_flip`` false, the LA bundle's flip test-time
   augmentation off: 4 passes would cost the demo time and the README's tables were measured without it);
4. writes a report with :func:`diffcl_algo.evaluation.report.report`: metrics table of both models, learning
   curves, best / worst case overlays (PNG), plus ``demo_summary.json``.

``--contrast_range "[1.5, 1.5]"`` removes the shift (every case like the labeled ones, the task of the previous
versions of the demo): three labels then suffice and the unlabeled cases add little (seed 0: Diff-CL 0.9496,
supervised-only 0.9382, against 0.7402 and 0.6026 with the shift).

Layout of ``output_dir``: ``data/`` (synthetic dataset), ``diffcl/`` and ``supervised/`` (training outputs:
``model.pt``, ``train_state.pt``, ``train.log``, TensorBoard events; ``eval/`` inside each), ``report/``.
The graph ships in the package, so the demo runs from any directory and needs no repository checkout.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from diffcl_algo.bundle.run import run_workflow
from diffcl_algo.convert.synthetic import REFERENCE_CONTRAST, make_shifted_dataset
from diffcl_algo.evaluation.report import report
from diffcl_algo.utils import write_text

__all__ = ["MODELS", "demo", "demo_table"]

#: Demo models: display name -> (output folder, ablation switches use_cps / use_hfm / use_cl).
MODELS = {"Diff-CL": ("diffcl", True), "Supervised only": ("supervised", False)}


def demo(
    output_dir: str = "demo_output",
    seed: int = 0,
    iterations: int = 300,
    quick: bool = False,
    num_labeled: int = 3,
    num_unlabeled: int = 9,
    num_test: int = 8,
    contrast_range: Sequence[float] = (0.8, REFERENCE_CONTRAST),
    shape: Sequence[int] = (48, 48, 32),
    patch_size: Sequence[int] = (32, 32, 32),
    n_filters: int = 8,
    device: str = "cpu",
    num_threads: Optional[int] = 1,
    options: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """Train and evaluate Diff-CL and the supervised-only baseline on synthetic data, then write a report.

    Args:
        output_dir: everything goes here (created; an existing demo output is overwritten).
        seed: seed of the synthetic data and of training.
        iterations: training iterations per model (each validated every ``iterations // 6``).
        quick: smoke-test scale (10 iterations, 32x32x16 volumes, 4 filters) for tests.
        num_labeled: labeled synthetic cases (first in train.list), all at the reference foreground contrast 1.5.
        num_unlabeled: unlabeled synthetic cases (after the labeled ones in train.list), their contrasts spread over
            contrast_range; 2 more cases of that spread end train.list and validate.
        num_test: held-out synthetic test cases (test.list), their contrasts spread over contrast_range.
        contrast_range: (low, high) foreground contrast of the unlabeled, validation and test cases; the labeled
            ones have 1.5, so [1.5, 1.5] is the task without a shift.
        shape: synthetic volume shape (X, Y, Z).
        patch_size: training patch and sliding window (divisible by 16).
        n_filters: V-Net width (paper 16).
        device: ``"cpu"`` or ``"cuda"``.
        num_threads: torch intra-op CPU threads during the demo (restored afterwards; None: unchanged). 1 by
            default: networks this small gain little from more threads, and when other processes share the cores,
            multi-threaded runs slow down by an order of magnitude (measured: 1.8 s -> 35 s per epoch).
        options: bundle ids set for both models' training and evaluation, to try an option on the demo (e.g. the
            paper's form without the mean teacher: ``{"ema_decay": 0.0}``; on the command
            line ``--options "{'ema_decay': 0.0}"``); they override the demo's own
            values. The ablation switches are the demo's own and are refused.

    Returns:
        ``{"output_dir", "report": report(...) result, "models": {name: {"dice", "jaccard", "hd95", "asd", "train_s",
        "eval_s"}}, "seconds"}``; also written to ``<output_dir>/demo_summary.json``.
    """
    threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(int(num_threads))
    try:
        return _demo(output_dir, seed, iterations, quick, num_labeled, num_unlabeled, num_test, contrast_range, shape,
                     patch_size, n_filters, device, dict(options or {}))  # fmt: skip
    finally:
        torch.set_num_threads(threads)


def _demo(
    output_dir: str,
    seed: int,
    iterations: int,
    quick: bool,
    num_labeled: int,
    num_unlabeled: int,
    num_test: int,
    contrast_range: Sequence[float],
    shape: Sequence[int],
    patch_size: Sequence[int],
    n_filters: int,
    device: str,
    options: dict[str, Any],
) -> dict[str, Any]:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be one integer, got {seed!r}: run the demo once per seed")
    switches = sorted(set(options) & {"use_cps", "use_hfm", "use_cl"})
    if switches:
        raise ValueError(f"demo options {switches}: the demo sets the ablation switches itself (Diff-CL vs supervised)")
    start = time.time()
    if quick:
        iterations, shape, patch_size, n_filters = 10, (32, 32, 16), (32, 32, 16), 4
    out = Path(output_dir).resolve()
    for folder in [f for f, _ in MODELS.values()] + ["report"]:  # a previous demo's runs (its event files)
        shutil.rmtree(out / folder, ignore_errors=True)
    data_dir = make_shifted_dataset(
        out / "data", num_labeled=num_labeled, num_unlabeled=num_unlabeled, num_val=2, num_test=num_test, shape=shape,
        seed=seed, contrast_range=contrast_range, overwrite=True,
    )
    strides = [max(p // 2, 1) for p in patch_size]
    epoch = -(-num_unlabeled // 2)  # iterations per epoch (2 unlabeled per iteration)
    common = {
        "dataset_dir": str(data_dir),
        "dataset_name": None,  # synthetic data: schedules.DEFAULT_HYPERPARAMS, not a Table 2 row
        "num_labeled": num_labeled,
        "patch_size": list(patch_size),
        "strides": strides,
        "n_filters": n_filters,
        "device": device,
        "use_hfm": True,
        "seed": seed,
        **options,
    }
    train = {
        **common,
        "val_list": "val.list",  # absent: validate on the last 2 cases of train.list, never on test.list
        "num_val_holdout": 2,
        "max_iterations": iterations,
        "t_max": max(iterations / epoch, 1.0),  # the ramp reaches its peak at the end of the short run
        "ema_decay": 0.9,  # the mean teacher averages about 10 iterations: at 0.99 it lags much of the short run
        "unsup_ramp": True,  # the first pseudo-labels, before the CS has learned, weigh little
        "val_interval": max(iterations // 6, 1),
        "ckpt_interval": iterations,
        "progress": False,
        "log_every": max(iterations // 10, 1),
        "nets#cs_head_def#out_channels": 16,
        "nets#contrastive_def#num_anchors": 32,
        "nets#contrastive_def#num_unlabeled": 1024,
        "nets#contrastive_def#top_k": 64,
        "nets#contrastive_def#samples_per_class": 128,
        **options,
    }
    models: dict[str, dict[str, Any]] = {}
    runs = {}
    for name, (folder, full) in MODELS.items():
        run_dir = out / folder
        switches = {"use_cps": full, "use_hfm": full, "use_cl": full}
        t0 = time.time()
        run_workflow("la", "train", output_dir=str(run_dir), **{**train, **switches})
        t1 = time.time()
        run_workflow(
            "la", "evaluate", output_dir=str(run_dir / "eval"), ckpt_path=str(run_dir / "model.pt"),
            eval_list="test.list", **{"tta_flip": False, **common, "use_hfm": full},  # one pass, as the README's tables
        )
        summary = json.loads((run_dir / "eval" / "metrics_summary.json").read_text())
        models[name] = {k: v["mean"] for k, v in summary["metrics"].items()}
        models[name].update(train_s=round(t1 - t0, 1), eval_s=round(time.time() - t1, 1))
        runs[name] = (str(run_dir), str(run_dir / "eval"))
    result = report(runs=runs, output_dir=out / "report")
    summary = {"output_dir": str(out), "report": result, "models": models, "seconds": round(time.time() - start, 1)}
    write_text(out / "demo_summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    print(demo_table(models, num_test) + f"\nreport: {out / 'report'}  ({summary['seconds']} s)")
    return summary


def demo_table(models: dict[str, dict[str, Any]], num_test: int) -> str:
    """The table the demo prints (and the README quotes): one row per model, mean test metrics.

    Args:
        models: ``{name: {"dice", "jaccard", "hd95", "asd", ...}}`` (``demo_summary.json``'s ``models``).
        num_test: number of synthetic test cases.
    """
    lines = [f"{'model':<16} {'Dice':>7} {'Jaccard':>8} {'95HD':>7} {'ASD':>6}  (synthetic test set, {num_test} cases)"]
    for name, m in models.items():
        lines.append(f"{name:<16} {m['dice']:7.4f} {m['jaccard']:8.4f} {m['hd95']:7.2f} {m['asd']:6.2f}")
    return "\n".join(lines)
