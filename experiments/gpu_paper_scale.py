"""Paper-scale LA in one device call: full Diff-CL and supervised-only at full resolution, scored on the report split.

Made for a GPU machine that carries the working tree and at most 64 MiB: the packed LA cases
(``experiments/pack_la.py``) and the wheels its image lacks (``.whl``: monai, pytorch-ignite, nibabel, fire,
termcolor; a mamba-ssm wheel when one was built). One command, under 9 minutes on one H200 (docs/gpu.md):

    python3 experiments/gpu_paper_scale.py --packed data/LA_packed.npz --wheels .whl

Phases, each time-boxed and logged with timestamps (``progress.log``):

1. install the carried wheels into ``<work>/site``; report torch, the GPU and whether mamba-ssm's kernel imports
   (else the package's portable selective scan runs);
2. unpack the cases into ``<work>/LA`` (the bundle's LA h5 layout);
3. train the Table 6 rows ``sup`` and ``full`` for every seed of ``--seeds``, all at once (under the CUDA MPS
   daemon when it starts), with the stock bundle CLI (``bundles/la/configs/train.yaml``):
   patch 112x112x80, 16 filters, bf16 autocast, ``num_labeled`` labeled cases, report split = the last
   ``num_test_holdout`` cases of train.list (never trained or selected on), selection split = the
   ``num_val_holdout`` before them, per-volume z-score; the Gaussian ramp spans the shortened schedule and also
   warms up the unsupervised terms, as in the CPU protocol (``bundles/la/configs/cpu.yaml``);
4. evaluate the last and the selected weights of every run on the report split (``evaluate.yaml``);
5. write ``summary.json``, ``summary.md`` (the means, and full Diff-CL against supervised-only case by case for
   each seed) and ``logs.tar.gz`` (every run's training and evaluation log) into ``$OUT`` (``./gpu_out`` when
   unset), beside ``progress.log``: four files, whatever the number of seeds.

A phase that runs past its time box is stopped; whatever it wrote (``model.pt`` of the last validation,
``train_state.pt`` of the last checkpoint) is still scored, and the summary says so.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any, Sequence, TextIO

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"
TRAIN = [str(REPO / "bundles/la/configs/train.yaml")]
EVALUATE = [str(REPO / "bundles/la/configs/evaluate.yaml")]
#: Training values that evaluation must share (network, data, split, window).
EVAL_IDS = ("use_hfm", "hfm_stages", "hfm_layer_scale", "residual", "normalize_intensity", "n_filters", "norm",
            "dataset_dir", "num_labeled", "num_test_holdout", "num_val_holdout", "patch_size", "strides",
            "sw_batch_size", "num_workers", "amp")
ENV_REPORT = """import json, torch
from diffcl_algo.networks.ssm import MAMBA_SSM_AVAILABLE
cuda = torch.cuda.is_available()
print(json.dumps({"torch": torch.__version__, "cuda": cuda, "gpu": torch.cuda.get_device_name(0) if cuda else None,
                  "mamba_ssm_kernel": bool(MAMBA_SSM_AVAILABLE)}))"""


class Clock:
    """Timestamped progress lines on stdout and in a log file; seconds since the start."""

    def __init__(self, log: TextIO) -> None:
        self.start, self.file = time.monotonic(), log

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def say(self, message: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} [+{self.elapsed():4.0f}s] {message}"
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()


def _last_line(log: Path) -> str:
    lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()] if log.exists() else []
    return lines[-1][-160:] if lines else "(no output yet)"


def run_parallel(
    jobs: dict[str, tuple[list[str], Path]], timeout: float, clock: Clock, env: dict[str, str], poll: float = 30.0
) -> dict[str, dict[str, Any]]:
    """Start every ``name: (command, log)`` at once from the repository root; stop the ones running at ``timeout``.

    Each command runs in its own process group (its data-loader workers included), which is killed on timeout or
    when this function exits early. Progress: a job's last log line every ``poll`` seconds, when it changed.

    Returns:
        ``{name: {"rc", "seconds", "timed_out"}}``.
    """
    start, procs, done, shown = time.monotonic(), {}, {}, {}
    try:
        for name, (cmd, log) in jobs.items():
            with open(log, "w") as out:
                procs[name] = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env,
                                               start_new_session=True)
            clock.say(f"started {name} (pid {procs[name].pid}), log {log.name}")
        last_report = start
        while len(done) < len(procs):
            time.sleep(min(1.0, poll))
            now = time.monotonic()
            for name, proc in procs.items():
                if name in done:
                    continue
                timed_out = proc.poll() is None and now - start > timeout
                if timed_out:
                    os.killpg(proc.pid, signal.SIGKILL)
                if timed_out or proc.poll() is not None:
                    rc = proc.wait()
                    done[name] = {"rc": rc, "seconds": round(now - start, 1), "timed_out": timed_out}
                    end = "stopped at the time box" if timed_out else f"exit {rc}"
                    clock.say(f"{name}: {end}: {_last_line(jobs[name][1])}")
            if now - last_report >= poll:
                last_report = now
                for name in procs.keys() - done.keys():
                    line = _last_line(jobs[name][1])
                    if shown.get(name) != line:
                        shown[name] = line
                        clock.say(f"{name}: {line}")
    finally:  # this script stopped early: stop what it started
        for name, proc in procs.items():
            if name not in done and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    return done


def install_wheels(wheels: Path, site: Path, clock: Clock, timeout: float = 180.0) -> list[str]:
    """``pip install --no-index --no-deps --target site`` of ``wheels/*.whl``; ``site`` joins ``sys.path``."""
    found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    if found:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, found)]
        subprocess.run(cmd, check=True, timeout=timeout)
        sys.path.insert(0, str(site))
        importlib.invalidate_caches()
    clock.say(f"wheels installed: {[w.name for w in found] or 'none carried'}")
    return [w.name for w in found]


def start_mps(clock: Clock) -> dict[str, str]:
    """Start the CUDA MPS daemon so that the jobs' small kernels share the GPU; {} (no MPS) when it fails."""
    control = shutil.which("nvidia-cuda-mps-control")
    if control is None:
        clock.say("MPS: nvidia-cuda-mps-control not found; jobs time-share the GPU")
        return {}
    env = {"CUDA_MPS_PIPE_DIRECTORY": "/tmp/mps_pipe", "CUDA_MPS_LOG_DIRECTORY": "/tmp/mps_log"}
    for d in env.values():
        os.makedirs(d, exist_ok=True)
    full = {**os.environ, **env}
    try:
        subprocess.run([control, "-d"], env=full, check=True, timeout=20)
        probe = "import torch; x = torch.ones(8, device='cuda'); print(float(x.sum()))"
        subprocess.run([sys.executable, "-c", probe], env=full, check=True, timeout=60, capture_output=True)
    except (subprocess.SubprocessError, OSError) as err:
        clock.say(f"MPS: did not start ({err}); jobs time-share the GPU")
        subprocess.run(f"echo quit | {control}", shell=True, env=full, timeout=20)
        return {}
    clock.say("MPS: daemon started, a CUDA probe ran under it")
    return env


def train_overrides(args: argparse.Namespace, data_dir: Path, extra: dict[str, str]) -> dict[str, Any]:
    """Bundle overrides shared by every row and seed; ``extra`` (the ``--set`` pairs) last."""
    return {
        "dataset_dir": str(data_dir),
        "num_labeled": args.num_labeled,
        "num_test_holdout": args.num_test_holdout,
        "num_val_holdout": args.num_val_holdout,
        "normalize_intensity": "true",
        "amp": "true",
        "amp_dtype": "bfloat16",
        "patch_size": "[112,112,80]",
        "n_filters": 16,
        "val_interval": args.val_interval,
        "ckpt_interval": args.val_interval,  # a run stopped by its time box still has recent last weights
        "t_max": "$int(@max_iterations) / @train#epoch_length",
        "unsup_ramp": "true",
        "progress": "false",
        "log_every": args.log_every,
        "num_workers": args.num_workers,
        "sw_batch_size": args.sw_batch_size,
        **extra,
    }


def _run_facts(run_dir: Path) -> dict[str, Any]:
    """Iterations reached and the selected (best validation) iteration, from ``train_state.pt``."""
    import torch

    path = run_dir / "train_state.pt"
    if not path.exists():
        return {"iterations": None, "selected_iteration": None}
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {"iterations": int(state["iteration"]), "selected_iteration": int(state.get("best_iteration", -1))}


def summary_markdown(summary: dict[str, Any]) -> str:
    """The summary as a markdown table: one line per row and weights, mean report-split metrics."""
    env = summary["environment"]
    lines = [
        f"# Paper-scale LA run ({summary['date']})",
        "",
        f"torch {env.get('torch')}, GPU {env.get('gpu')}, mamba-ssm kernel: {env.get('mamba_ssm_kernel')}; "
        f"cases: {summary['split']}; unpack {summary['unpack']['seconds']} s",
        "",
        "| row | iterations (asked / done) | train s | weights | Dice | Jaccard | 95HD | ASD |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row, info in summary["rows"].items():
        for kind in ("last", "selected"):
            mean = info.get(kind, {}).get("mean")
            cells = " | ".join(f"{mean[m]:.4f}" for m in ("dice", "jaccard", "hd95", "asd")) if mean else \
                f"not scored: {info.get(kind, {}).get('error', 'no weights')} | | |"
            lines.append(f"| {row} | {info['max_iterations']} / {info['iterations']} | {info['train']['seconds']}"
                         f"{' (time box)' if info['train']['timed_out'] else ''} | {kind} | {cells} |")
    lines += ["", "| seed | weights | full - sup Dice | cases better / worse |", "|---|---|---|---|"]
    for name, info in summary["rows"].items():
        sup = summary["rows"].get(name.replace("full_", "sup_", 1)) if info.get("row") == "full" else None
        for kind in ("last", "selected") if sup else ():
            a, b = info.get(kind, {}).get("cases"), sup.get(kind, {}).get("cases")
            if a and b:
                diffs = [a[c]["dice"] - b[c]["dice"] for c in a if c in b]
                better, worse = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
                lines.append(f"| {info['seed']} | {kind} | {sum(diffs) / len(diffs):+.4f} | {better} / {worse} |")
    return "\n".join(lines) + "\n"


def add_device_arguments(p: argparse.ArgumentParser, work: str) -> None:
    """``--wheels``, ``--work`` and ``--out``: what every device script takes."""
    p.add_argument("--wheels", default=".whl", help="folder of carried wheels (skipped when absent)")
    p.add_argument("--work", default=work, help="scratch folder: site-packages, data, runs")
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_out", help="results folder ($OUT on the device)")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--packed", default="data/LA_packed.npz", help="file written by experiments/pack_la.py pack")
    add_device_arguments(p, "/tmp/diffcl_gpu")
    p.add_argument("--full_iters", type=int, default=900, help="iterations of full Diff-CL")
    p.add_argument("--sup_iters", type=int, default=900, help="iterations of supervised-only")
    p.add_argument("--val_interval", type=int, default=150, help="iterations between validations (and checkpoints)")
    p.add_argument("--num_labeled", type=int, default=8)
    p.add_argument("--num_test_holdout", type=int, default=16, help="report split: the last N cases of train.list")
    p.add_argument("--num_val_holdout", type=int, default=8, help="selection split: the N cases before it")
    p.add_argument("--seeds", default="0", help="seeds, comma-separated: each trains both rows, all at once")
    p.add_argument("--mps", action=argparse.BooleanOptionalAction, default=True, help="try the CUDA MPS daemon")
    p.add_argument("--num_workers", type=int, default=4, help="data-loader workers of each process")
    p.add_argument("--sw_batch_size", type=int, default=4, help="sliding windows per forward (validation, evaluation)")
    p.add_argument("--log_every", type=int, default=50)
    p.add_argument("--unpack_workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--budget_s", type=float, default=510.0, help="the whole script ends within this many seconds")
    p.add_argument("--train_timeout", type=float, default=330.0, help="time box of the training phase")
    p.add_argument("--eval_timeout", type=float, default=110.0, help="time box of the evaluation phase")
    p.add_argument("--poll", type=float, default=30.0, help="seconds between progress lines")
    p.add_argument("--set", default="", help="extra bundle overrides for training, 'id=value' pairs (toy runs)")
    args = p.parse_args(argv)
    args.seeds = [int(x) for x in str(args.seeds).split(",") if x.strip()]
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the phases; returns the summary also written to ``<out>/summary.json``."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` / a device time limit: clean up children
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    with open(out / "progress.log", "w") as log:
        clock = Clock(log)
        clock.say(f"paper-scale LA run: packed {args.packed}, work {work}, out {out}")
        wheels = install_wheels(Path(args.wheels), work / "site", clock)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(work / "site"), str(REPO), os.environ.get(
            "PYTHONPATH", "")]), "PYTHONUNBUFFERED": "1"}
        report = subprocess.run([sys.executable, "-c", ENV_REPORT], cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=120)
        ok = report.returncode == 0
        environment = json.loads(report.stdout.splitlines()[-1]) if ok else {"error": report.stderr[-500:]}
        clock.say(f"environment: {environment}")
        sys.path[:0] = [str(REPO), str(EXPERIMENTS)]
        import la_cpu  # here, after the wheels: it needs fire and monai
        import pack_la

        data_dir = work / "LA"
        unpacked = pack_la.unpack(args.packed, str(data_dir), workers=args.unpack_workers)
        clock.say(f"unpacked {unpacked['cases']} cases in {unpacked['seconds']} s")
        pool = unpacked["cases"] - args.num_test_holdout - args.num_val_holdout
        split = {"labeled": args.num_labeled, "unlabeled": pool - args.num_labeled,
                 "selection": args.num_val_holdout, "report": args.num_test_holdout}

        common = train_overrides(args, data_dir, la_cpu._parse_set(args.set))
        if args.mps:
            env.update(start_mps(clock))
        iters = {"sup": args.sup_iters, "full": args.full_iters}
        runs = {f"{row}_s{seed}": (row, seed) for seed in args.seeds for row in iters}
        run_dirs = {name: work / "runs" / name for name in runs}
        jobs = {}
        for name, (row, seed) in runs.items():
            run_dirs[name].mkdir(parents=True)
            overrides = {**la_cpu.ROWS[row], **common, "seed": seed, "max_iterations": iters[row],
                         "output_dir": str(run_dirs[name])}
            jobs[name] = (la_cpu.bundle_command("training", TRAIN, overrides), run_dirs[name] / "train.log")
        train_box = min(args.train_timeout, args.budget_s - clock.elapsed() - args.eval_timeout - 15)
        clock.say(f"training {sorted(runs)} at once, time box {train_box:.0f} s")
        trained = run_parallel(jobs, train_box, clock, env, args.poll)

        rows, eval_jobs = {}, {}
        for name, run_dir in run_dirs.items():
            row, seed = runs[name]
            rows[name] = {"row": row, "seed": seed, "max_iterations": iters[row], "train": trained[name],
                          **_run_facts(run_dir)}
            weights = {"selected": run_dir / "model.pt"}
            if (run_dir / "train_state.pt").exists():
                weights["last"] = la_cpu._last_weights(run_dir)
            shared = {k: v for k, v in {**la_cpu.ROWS[row], **common}.items() if k in EVAL_IDS}
            for kind, path in weights.items():
                if not path.exists():
                    continue
                eval_dir = run_dir / f"eval_{kind}"
                overrides = {**shared, "ckpt_path": str(path), "output_dir": str(eval_dir)}
                eval_jobs[f"{name}_{kind}"] = (la_cpu.bundle_command("evaluating", EVALUATE, overrides),
                                               run_dir / f"eval_{kind}.log")
        eval_box = max(10.0, min(args.eval_timeout, args.budget_s - clock.elapsed() - 5))
        clock.say(f"evaluating {sorted(eval_jobs)} on the report split at once, time box {eval_box:.0f} s")
        evaluated = run_parallel(eval_jobs, eval_box, clock, env, args.poll)
        for name, run_dir in run_dirs.items():
            for kind in ("last", "selected"):
                result = evaluated.get(f"{name}_{kind}")
                if result is None:
                    rows[name][kind] = {"error": "no weights written"}
                elif result["rc"] != 0 or result["timed_out"]:
                    rows[name][kind] = {"error": f"evaluation {'timed out' if result['timed_out'] else 'failed'}",
                                        "log_tail": _last_line(run_dir / f"eval_{kind}.log"), **result}
                else:
                    rows[name][kind] = {**la_cpu._scores(run_dir / f"eval_{kind}"), "eval": result}
        summary = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": round(clock.elapsed(), 1),
                   "environment": environment, "wheels": wheels, "unpack": unpacked, "split": split,
                   "overrides": {k: str(v) for k, v in common.items() if k != "dataset_dir"}, "rows": rows}
        with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:  # one file: the device returns at most eight
            for name, run_dir in run_dirs.items():
                for log in sorted(run_dir.glob("*.log")):
                    tar.add(log, arcname=f"{name}/{log.name}")
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (out / "summary.md").write_text(summary_markdown(summary))
        clock.say(f"done in {clock.elapsed():.0f} s: {out / 'summary.md'}\n{summary_markdown(summary)}")
    return summary


if __name__ == "__main__":
    main()
