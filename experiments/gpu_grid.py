"""The reduced CPU protocol's rows, many at once, on a lent GPU: one time-boxed device call (docs/gpu.md).

Each job is one ``experiments/la_cpu.py run`` (the bundle's own training and evaluating commands with
``bundles/la/configs/cpu.yaml``: half resolution, patch 48x48x32, n_filters 8, 1280 iterations; scored on the report
split), so a row measured here is the row of docs/results.md, on another device. Jobs start in the plan's order,
``--concurrency`` at a time (one CPU thread each); the plan is a priority list, and the script keeps the whole call
inside ``--budget_s``:

- a job starts only while its expected duration (the durations seen so far; before any, ``--first_guess_s``) fits
  the time left;
- every ``--poll`` seconds each running job's rate (iterations per second, from its ``train.log``) predicts its end;
  while one is predicted past the deadline, the running job latest in the plan is stopped, which speeds up the rest;
- at the deadline every job still running is stopped. Stopped jobs are listed, never scored.

Writes into ``$OUT`` (``./gpu_out`` when unset): ``progress.log``, ``summary.md`` (``la_cpu.py table`` and the paired
``compare`` of every plan row against ``sup``), ``results.tar.gz`` (each finished run's ``summary.json``,
``train.log``, TensorBoard events and per-case metrics, laid out as ``runs/gpu`` so that ``la_cpu.py table --root
runs/gpu`` reads it back) and the CS weights (``model_last.pt``) of the runs named by ``--keep``.

    PYTHONUNBUFFERED=1 python3 experiments/gpu_grid.py --wheels .whl --packed data/LA_half_packed.npz

``--packed`` names the half-resolution LA packed by ``experiments/pack_la.py`` (lossless, 33.9 MiB instead of the
h5 folder's 57 MB, so that it travels beside the working tree and the wheels); it is unpacked where ``cpu.yaml``'s
``dataset_dir`` points before the jobs start. Without it that folder must travel itself.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any, Sequence

from gpu_paper_scale import ENV_REPORT, Clock, add_device_arguments, install_wheels, start_mps

REPO = Path(__file__).resolve().parents[1]
ITERATIONS = 1280  # cpu.yaml's max_iterations
#: name -> (la_cpu row, bundle overrides, DDIM steps of the DS-from-noise evaluation, pseudo-label monitor)
ROWS = {
    "sup": ("sup", "", 0, False),
    "sup_avg": ("sup_avg", "", 0, False),
    "full": ("full", "", 10, True),
    "cps": ("cps", "", 0, True),
    "cps_hfm": ("cps_hfm", "", 0, True),
    "reference": ("reference", "normalize_intensity=true", 0, False),
}
#: the default plan, in priority order: (name, labeled, seeds, fold)
PLAN = (
    ("sup_avg", 4, (0, 1, 2), 0), ("full", 4, (0, 1, 2), 0), ("sup", 4, (0, 1, 2), 0),
    ("sup_avg", 8, (0, 1, 2), 0), ("full", 8, (0, 1, 2), 0), ("sup", 8, (0, 1, 2), 0),
    ("sup_avg", 4, (0, 1, 2), 1), ("full", 4, (0, 1, 2), 1), ("sup", 4, (0, 1, 2), 1),
    ("cps", 4, (0, 1, 2), 0), ("cps_hfm", 4, (0, 1, 2), 0), ("reference", 4, (0, 1, 2), 0),
    ("sup_avg", 8, (0, 1, 2), 1), ("full", 8, (0, 1, 2), 1), ("sup", 8, (0, 1, 2), 1),
)  # fmt: skip
ITER_LINE = re.compile(r"Epoch: (\d+)/\d+, Iter: (\d+)/(\d+)")


def expand(plan: Sequence[tuple[str, int, Sequence[int], int]]) -> list[dict[str, Any]]:
    """One job per (name, labeled, seed, fold), in plan order."""
    return [{"name": n, "labeled": lab, "seed": s, "fold": f} for n, lab, seeds, f in plan for s in seeds]


def job_key(job: dict[str, Any]) -> str:
    return f"{job['name']}/l{job['labeled']}_s{job['seed']}" + (f"_f{job['fold']}" if job["fold"] else "")


def job_command(job: dict[str, Any], root: Path, extra: str = "") -> list[str]:
    """``la_cpu.py run`` of one job; ``extra``: overrides added to the row's own."""
    row, overrides, ds_steps, monitor = ROWS[job["name"]]
    return [sys.executable, str(REPO / "experiments/la_cpu.py"), "run", row, "--num_labeled", str(job["labeled"]),
            "--seed", str(job["seed"]), "--fold", str(job["fold"]), "--root", str(root), "--name", job["name"],
            "--set", f"{overrides} {extra}".strip(), "--ds_eval_steps", str(ds_steps),
            *(["--monitor"] if monitor else [])]  # fmt: skip


def iterations_done(run_dir: Path) -> int:
    """The last iteration that ``train.log`` reports (0 before the first line)."""
    log = run_dir / "train.log"
    found = ITER_LINE.findall(log.read_text(errors="replace")) if log.exists() else []
    if not found:
        return 0
    epoch, it, length = map(int, found[-1])
    return (epoch - 1) * length + it


class Pool:
    """Runs jobs in plan order, ``slots`` at a time, inside a deadline (see the module docstring)."""

    def __init__(self, jobs: list[dict], root: Path, slots: int, deadline: float, first_guess: float,
                 env: dict[str, str], clock: Clock, logs: Path, extra: str = "") -> None:  # fmt: skip
        self.queue, self.root, self.slots, self.deadline, self.extra = list(jobs), root, slots, deadline, extra
        self.first_guess, self.env, self.clock, self.logs = first_guess, env, clock, logs
        self.running: dict[str, tuple[dict, subprocess.Popen, float]] = {}
        self.finished: dict[str, dict] = {}
        self.marks: dict[str, tuple[int, float]] = {}  # job -> (iterations, time) when first seen past 64
        self.trained: dict[str, float] = {}  # job -> when its training was first seen complete

    def _expected(self) -> float:
        seconds = [r["seconds"] for r in self.finished.values() if r["rc"] == 0]
        return max(seconds) if seconds else self.first_guess

    def _start_ready(self, now: float) -> None:
        while self.queue and len(self.running) < self.slots:
            job = self.queue.pop(0)
            key = job_key(job)
            if now + self._expected() > self.deadline:
                self.finished[key] = {**job, "rc": None, "seconds": 0, "status": "not started: no time left"}
                continue
            log = self.logs / (key.replace("/", "__") + ".out")
            with open(log, "w") as out:
                cmd = job_command(job, self.root, self.extra)
                proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                        start_new_session=True)  # fmt: skip
            self.running[key] = (job, proc, now)
            self.clock.say(f"started {key}")

    def _stop(self, key: str, status: str, now: float) -> None:
        job, proc, start = self.running.pop(key)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        self.finished[key] = {**job, "rc": None, "seconds": round(now - start, 1), "status": status,
                              "iterations": iterations_done(self.root / key)}  # fmt: skip
        self.clock.say(f"{key}: {status} at iteration {self.finished[key]['iterations']}")

    def _reap(self, now: float) -> None:
        for key, (job, proc, start) in list(self.running.items()):
            if proc.poll() is not None:
                del self.running[key]
                ok = proc.returncode == 0 and (self.root / key / "summary.json").exists()
                evals = round(now - self.trained[key], 1) if key in self.trained else None
                self.finished[key] = {**job, "rc": proc.returncode, "seconds": round(now - start, 1),
                                      "eval_seconds": evals, "status": "scored" if ok else "failed"}  # fmt: skip
                self.clock.say(f"{key}: {self.finished[key]['status']} in {now - start:.0f} s")

    def _predicted_end(self, now: float) -> dict[str, float]:
        """Per running job: when it should end (training at its rate since iteration 64, then its evaluations)."""
        evals = [r["eval_seconds"] for r in self.finished.values() if r.get("eval_seconds")]
        eval_guess = max(evals) if evals else 0.25 * self.first_guess
        out = {}
        for key in self.running:
            done = iterations_done(self.root / key)
            if done >= ITERATIONS:
                self.trained.setdefault(key, now)
                continue
            if done >= 64:
                mark = self.marks.setdefault(key, (done, now))
                if done >= mark[0] + 64:
                    out[key] = now + (ITERATIONS - done) * (now - mark[1]) / (done - mark[0]) + eval_guess
        return out

    def run(self, poll: float) -> dict[str, dict]:
        last_check = time.monotonic()
        try:
            while self.queue or self.running:
                now = time.monotonic()
                self._reap(now)
                if now >= self.deadline:
                    for key in list(self.running):
                        self._stop(key, "stopped at the deadline", now)
                    break
                self._start_ready(now)
                if now - last_check >= poll and self.running:
                    last_check = now
                    ends = self._predicted_end(now)
                    status = ", ".join(f"{k} {iterations_done(self.root / k)}" for k in self.running)
                    self.clock.say(f"running: {status}")
                    if any(end > self.deadline for end in ends.values()) and len(self.running) > 1:
                        self.queue.clear()  # nothing new starts once the running jobs are short of time
                        self._stop(list(self.running)[-1], "stopped to let earlier jobs finish", now)
                time.sleep(2.0)
        finally:
            for key in list(self.running):
                self._stop(key, "stopped (the script ended)", time.monotonic())
        for key in self.queue:
            self.finished[job_key(key)] = {**key, "rc": None, "seconds": 0, "status": "not started"}
        return self.finished


def pack_results(root: Path, out: Path) -> Path:
    """``results.tar.gz``: every scored run's summary, logs, events and per-case metrics, under ``runs/gpu/``."""
    archive = out / "results.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root / "jobs.json", arcname="runs/gpu/jobs.json")
        for summary in sorted(root.glob("*/*/summary.json")):
            run_dir = summary.parent
            for path in sorted(run_dir.rglob("*")):
                if path.is_file() and path.suffix != ".pt" and not path.name.endswith(".nii.gz"):  # no masks
                    tar.add(path, arcname=str(Path("runs/gpu") / path.relative_to(root)))
    return archive


def tables(root: Path, names: list[str]) -> str:
    """``la_cpu.py table`` of the scored rows and the paired comparison of each against ``sup``."""
    import la_cpu

    found = [n for n in names if list((root / n).glob("l*_s*/summary.json"))]
    parts = [la_cpu.table(" ".join(found), root=str(root))]
    for name in found:
        for labeled in (4, 8):
            if name != "sup" and la_cpu._by_seed(name, labeled, "last", str(root)) and \
                    la_cpu._by_seed("sup", labeled, "last", str(root)):  # fmt: skip
                parts.append(la_cpu.compare(name, "sup", labeled, root=str(root)))
    return "\n\n".join(parts)


def protocol_dataset_dir() -> Path:
    """The folder the CPU protocol reads (``dataset_dir`` of ``bundles/la/configs/cpu.yaml``), in this checkout."""
    import yaml

    return REPO / yaml.safe_load((REPO / "bundles/la/configs/cpu.yaml").read_text())["dataset_dir"]


def unpack_dataset(packed: Path, dst: Path, clock: Clock) -> None:
    """Unpack ``experiments/pack_la.py``'s file ``packed`` into ``dst`` (refused when ``dst`` holds cases already)."""
    import pack_la

    done = pack_la.unpack(str(packed), str(dst), workers=os.cpu_count() or 1)
    clock.say(f"unpacked {done['cases']} cases into {dst} in {done['seconds']} s")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_device_arguments(p, "/tmp/diffcl_grid")
    p.add_argument("--packed", default="", help="half-resolution LA packed by experiments/pack_la.py (else carried)")
    p.add_argument("--concurrency", type=int, default=18, help="jobs at once (one CPU thread each)")
    p.add_argument("--budget_s", type=float, default=540.0, help="the whole script ends within this many seconds")
    p.add_argument("--first_guess_s", type=float, default=300.0, help="a job's duration before any has finished")
    p.add_argument("--poll", type=float, default=20.0, help="seconds between progress checks")
    p.add_argument(
        "--keep",
        nargs="*",
        default=["full/l8_s0", "full_cp/l8_s0", "sup/l8_s0"],
        help="runs whose last CS weights (model_last.pt) come back",
    )
    p.add_argument("--set", default="", help="overrides added to every job (e.g. max_iterations=8 for a dry run)")
    p.add_argument("--mps", action=argparse.BooleanOptionalAction, default=True, help="try the CUDA MPS daemon")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    start = time.monotonic()
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    (work / "logs").mkdir(parents=True)
    with open(out / "progress.log", "w") as log:
        clock = Clock(log)
        install_wheels(Path(args.wheels), work / "site", clock)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(work / "site"), str(REPO), os.environ.get(
            "PYTHONPATH", "")]), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}  # fmt: skip
        report = subprocess.run([sys.executable, "-c", ENV_REPORT], cwd=REPO, env=env, capture_output=True,
                                text=True, timeout=120)  # fmt: skip
        clock.say(f"environment: {report.stdout.strip() or report.stderr[-500:]}")
        sys.path[:0] = [str(work / "site"), str(REPO), str(REPO / "experiments")]  # la_cpu needs all three
        if args.packed:
            unpack_dataset(Path(args.packed), protocol_dataset_dir(), clock)
        if args.mps:
            env.update(start_mps(clock))
        jobs = expand(PLAN)
        clock.say(f"{len(jobs)} jobs in the plan, {args.concurrency} at a time")
        root = work / "runs"
        pool = Pool(jobs, root, args.concurrency, start + args.budget_s - 45, args.first_guess_s, env, clock,
                    work / "logs", args.set)  # fmt: skip
        finished = pool.run(args.poll)
        (root / "jobs.json").write_text(json.dumps(finished, indent=1) + "\n")
        summary = tables(root, list(ROWS))
        (out / "summary.md").write_text(summary + "\n")
        clock.say(f"results:\n{summary}")
        pack_results(root, out)
        for key in args.keep:  # the device returns at most 8 files: these and the 4 above
            if (root / key / "summary.json").exists():
                shutil.copy(root / key / "model_last.pt", out / f"{key.replace('/', '__')}__model_last.pt")
        failed = [k for k, r in finished.items() if r["status"] == "failed"]
        for key in failed[:3]:
            tail = (work / "logs" / (key.replace("/", "__") + ".out")).read_text(errors="replace")[-1500:]
            clock.say(f"{key} failed; its output ends:\n{tail}")
        clock.say(
            f"done in {time.monotonic() - start:.0f} s: {sum(r['status'] == 'scored' for r in finished.values())}"
            f" scored, {len(failed)} failed"
        )


if __name__ == "__main__":
    main()
