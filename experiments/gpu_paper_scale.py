"""Paper-scale LA in one device call: full Diff-CL beside supervised-only, full resolution, scored on the report split.

Made for one GPU machine that carries the working tree and at most 64 MiB in all: the packed LA cases
(``experiments/pack_la.py``) and the packages its image lacks (``experiments/pack_site.py``: monai, pytorch-ignite,
nibabel, fire, termcolor as one site archive, or a folder of wheels). One command, within ``--budget_s`` (550 s)
(docs/gpu.md):

    python3 experiments/gpu_paper_scale.py --packed data/LA_packed.npz --wheels data/site.tar.xz

Phases, each logged with timestamps (``progress.log``) and each bounded by a wall-clock deadline:

1. the packages into ``<work>/site``;
2. unpack the cases into ``<work>/LA`` (the bundle's LA h5 layout, plain datasets);
3. one worker process (``--worker``) reports torch, the GPU, monai and whether mamba-ssm's kernel imports, then
   builds each trainer from ``bundles/la/configs/train.yaml`` with ``diffcl_algo.bundle.run.build_trainer`` (what
   ``python -m monai.bundle run training`` builds):

   a. throughput: ``--throughput_iters`` iterations (after ``--throughput_warmup``) of full Diff-CL and of
      supervised-only in fp32, then with bf16 autocast and channels-last (``amp``, ``amp_dtype``, ``channels_last``),
      and (``--cudnn_benchmark auto`` on CUDA) with cuDNN's autotuner too; one validation round is timed;
   b. sizing: the largest iteration count N that both rows reach one after the other before the training deadline
      at the measured speeds (``--safety`` of the time; ``--iterations`` fixes N);
   c. training: full Diff-CL (``use_cps use_hfm use_cl`` true), then supervised-only (all three false), N iterations
      each, the bundle's defaults otherwise (Table 2's LA row of ``num_labeled``, SGD, batch 2 + 2, the mean teacher
      ``ema_decay`` 0.99 in both rows) at the fastest measured setting, with: patch 112x112x80, 16 filters,
      ``num_labeled`` labeled cases, the report split = the last ``num_test_holdout`` cases of train.list (never
      trained or selected on), the selection split = the ``num_val_holdout`` before them, the Gaussian ramp
      spanning the N iterations (``t_max``, as the bundle's default ramp spans its default schedule),
      ``--val_rounds`` validations (Dice alone: the selection metric) and a checkpoint at each. A run still going at
      its deadline is stopped cleanly (its state saved) and scored as it is;
4. evaluate the last and the selected CS weights of both runs on the report split at full resolution, the paper's
   sliding window (``evaluate.yaml``, four processes at once): Dice, Jaccard, 95HD, ASD;
5. write into ``$OUT`` (``./gpu_out`` when unset): ``summary.json``, ``summary.md``, ``progress.log``,
   ``logs.tar.gz`` (worker, training and evaluation logs, per-case metrics) and ``cs_weights_fp16.pt`` (CS weights
   in half precision, split into ``.partN`` files of at most ``--part_mib`` MiB: at full scale full Diff-CL's selected
   and last weights, 28 MiB each, in four parts; supervised-only's, 18 MiB each, do not fit in the 64 MiB that
   return as well, and are left out): at most 8 files.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import traceback
from pathlib import Path
from typing import Any, Sequence, TextIO

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"
BUNDLE = REPO / "bundles/la"
EVALUATE = [str(BUNDLE / "configs/evaluate.yaml")]
#: Table 6 rows as bundle switches; both keep the bundle's mean teacher (``ema_decay``).
ROWS = {
    "full": {"use_cps": True, "use_hfm": True, "use_cl": True},
    "sup": {"use_cps": False, "use_hfm": False, "use_cl": False},
}
#: Speed settings: the bundle's (fp32), and bf16 autocast with channels-last memory order.
SPEEDS = {
    "fp32": {"amp": False, "channels_last": False},
    "bf16_cl": {"amp": True, "amp_dtype": "bfloat16", "channels_last": True},
}
#: Training values that evaluation must share (network, data, split, window, speed).
EVAL_IDS = ("use_hfm", "hfm_stages", "normalize_intensity", "n_filters", "dataset_dir", "num_labeled",
            "num_test_holdout", "num_val_holdout", "patch_size", "strides", "spacing", "sw_batch_size", "num_workers",
            "amp", "channels_last")  # fmt: skip
METRICS = ("dice", "jaccard", "hd95", "asd")
WEIGHTS_NAME = "cs_weights_fp16.pt"
MAX_OUT_FILES = 8
#: The environment as one JSON line (``experiments/gpu_grid.py`` runs it; the worker here reports it itself).
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
    """Make the carried packages importable from ``site`` (which joins ``sys.path``).

    ``wheels`` is a folder of ``.whl`` files (``pip install --no-index --no-deps --target site``) or a ``.tar.xz``
    site archive of ``experiments/pack_site.py`` (extracted into ``site``); absent: nothing to install.

    Returns:
        The wheel file names, or the ``.dist-info`` folders of the archive.
    """
    wheels = Path(wheels)
    if wheels.is_file():
        site.mkdir(parents=True, exist_ok=True)
        with tarfile.open(wheels, "r:*") as tar:
            names = sorted({m.name.split("/")[0] for m in tar.getmembers() if ".dist-info" in m.name.split("/")[0]})
            if hasattr(tarfile, "data_filter"):
                tar.extractall(site, filter="data")
            else:  # Python < 3.11.4
                tar.extractall(site)
        found = names
    else:
        whls = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
        if whls:
            cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                   "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, whls)]
            subprocess.run(cmd, check=True, timeout=timeout)
        found = [w.name for w in whls]
    if found:
        sys.path.insert(0, str(site))
        importlib.invalidate_caches()
    clock.say(f"packages installed: {found or 'none carried'}")
    return found


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


def add_device_arguments(p: argparse.ArgumentParser, work: str) -> None:
    """``--wheels``, ``--work`` and ``--out``: what every device script takes."""
    p.add_argument("--wheels", default=".whl", help="folder of carried wheels or a site archive (skipped when absent)")
    p.add_argument("--work", default=work, help="scratch folder: site-packages, data, runs")
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_out", help="results folder ($OUT on the device)")


def parse_set(pairs: str) -> dict[str, Any]:
    """``"id=value id=value"`` -> ``{id: value}`` (bundle overrides; Python literals such as ``[32,32,16]`` or
    ``0.5`` are read as such, anything else stays text)."""
    out = {}
    for pair in str(pairs or "").split():
        if "=" not in pair:
            raise ValueError(f"--set expects id=value pairs separated by spaces, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def bundle_command(workflow: str, configs: list[str], overrides: dict[str, Any]) -> list[str]:
    """``python -m monai.bundle run <workflow> --config_file <configs> --<id> <value> ...`` (run from ``REPO``)."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", workflow, "--config_file", str(configs)]
    for key, value in overrides.items():
        text = json.dumps(value) if isinstance(value, (list, dict)) else str(value).lower() if isinstance(
            value, bool) else str(value)  # fmt: skip
        cmd += [f"--{key}", text]
    return cmd


def write_json(path: Path, data: Any) -> None:
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ the worker


def _release() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _build(overrides: dict[str, Any], benchmark: bool):
    """``build_trainer`` on the LA bundle; cuDNN's autotuner on or off (the bundle's seeding turns it off)."""
    import torch

    from diffcl_algo.bundle.run import build_trainer

    trainer = build_trainer(BUNDLE, **overrides)
    torch.backends.cudnn.benchmark = bool(benchmark)
    torch.backends.cudnn.deterministic = not benchmark
    return trainer


def _add_deadline(trainer: Any, deadline: float) -> dict[str, bool]:
    """Stop ``trainer`` cleanly (``COMPLETED`` fires: the state is saved) after the iteration that passes
    ``deadline`` (``time.time()``)."""
    from ignite.engine import Events

    stopped = {"stopped": False}

    def check(engine: Any) -> None:
        if time.time() > deadline and not stopped["stopped"]:
            stopped["stopped"] = True
            engine.logger.warning("deadline reached at iteration %d: stopping", engine.state.iteration)
            engine.terminate()

    trainer.add_event_handler(Events.ITERATION_COMPLETED, check)
    return stopped


def _validator(trainer: Any) -> Any:
    """The validation evaluator among the trainer's handlers (None when it has none)."""
    for handler in getattr(trainer, "train_handlers", None) or []:
        if getattr(handler, "validator", None) is not None:
            return handler.validator
    return None


def _peak_gib() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return round(peak, 2)


def measure(spec: dict[str, Any], row: str, speed: str, benchmark: bool, time_validation: bool) -> dict[str, Any]:
    """Iterations per second of one row at one speed setting (``warmup`` iterations first, not timed)."""
    from ignite.engine import Events

    warm, timed = spec["throughput_warmup"], spec["throughput_iters"]
    total = warm + timed + 1
    name = f"{row}_{speed}" + ("_bench" if benchmark else "")
    out_dir = Path(spec["work"]) / "throughput" / name
    out_dir.mkdir(parents=True, exist_ok=True)
    overrides = {**spec["common"], **ROWS[row], **SPEEDS[speed], "max_iterations": total,
                 "val_interval": total if time_validation else 0, "ckpt_interval": 10**9, "check_data": False,
                 "log_every": total, "output_dir": str(out_dir)}  # fmt: skip
    built = time.perf_counter()
    trainer = _build(overrides, benchmark)
    build_s = time.perf_counter() - built
    marks: dict[str, float] = {}

    def started(engine: Any) -> None:
        if engine.state.iteration in (warm + 1, total):  # ignite counts the iteration before ITERATION_STARTED
            _sync()
            marks[str(engine.state.iteration)] = time.perf_counter()

    trainer.add_event_handler(Events.ITERATION_STARTED, started)
    validator = _validator(trainer) if time_validation else None
    if validator is not None:
        validator.add_event_handler(Events.STARTED, lambda _: marks.__setitem__("val0", time.perf_counter()))
        validator.add_event_handler(Events.COMPLETED, lambda _: marks.__setitem__("val1", time.perf_counter()))
    stopped = _add_deadline(trainer, spec["throughput_deadline"])
    try:
        trainer.run()
    finally:
        trainer.close()
    result: dict[str, Any] = {"name": name, "row": row, "speed": speed, "cudnn_benchmark": benchmark,
                              "build_s": round(build_s, 1), "peak_gib": _peak_gib(),
                              "stopped_at_deadline": stopped["stopped"]}  # fmt: skip
    if str(warm + 1) in marks and str(total) in marks:
        result["its_per_s"] = round(timed / (marks[str(total)] - marks[str(warm + 1)]), 3)
        result["timed_iterations"] = timed
    if "val0" in marks and "val1" in marks:
        result["validation_s"] = round(marks["val1"] - marks["val0"], 2)
    del trainer
    _release()
    return result


def speed_settings(mode: str, cuda: bool) -> list[tuple[str, bool]]:
    """The ``(speed, cudnn_benchmark)`` settings the throughput phase measures: fp32 (the bundle's), bf16 with
    channels-last, and (``mode`` auto on CUDA, or on) the latter with cuDNN's autotuner."""
    bench = {"on": [True], "off": [False], "auto": [False, True] if cuda else [False]}[mode]
    return [("fp32", False)] + [(speed, b) for speed in SPEEDS if speed != "fp32" for b in bench]


def choose_speed(settings: list[tuple[str, bool]], rates: dict[tuple[str, bool, str], float], default: str,
                 benchmark: bool) -> tuple[str, bool]:  # fmt: skip
    """The setting to train at: among the speed options (not fp32) measured for both rows, the fastest for full
    Diff-CL; else fp32 when only it was measured (the options failed); else ``(default, benchmark)``."""
    measured = [o for o in settings if (*o, "full") in rates and (*o, "sup") in rates]
    options = [o for o in measured if o[0] != "fp32"] or measured
    return max(options, key=lambda o: rates[(*o, "full")]) if options else (default, benchmark)


def plan_iterations(spec: dict[str, Any], full_rate: float, sup_rate: float, val_s: float, build_s: float,
                    now: float) -> dict[str, Any]:  # fmt: skip
    """N, the validation interval and the full run's deadline: both rows, N iterations each, one after the other,
    with ``val_rounds`` validations each, before the training deadline (``safety`` of the time left)."""
    rounds = max(1, int(spec["val_rounds"]))
    seconds = spec["train_deadline"] - now
    if spec.get("iterations"):
        n = int(spec["iterations"])
    else:
        usable = seconds * spec["safety"] - 2 * build_s - 2 * rounds * val_s
        n = int(max(0.0, usable) / (1.0 / full_rate + 1.0 / sup_rate))
        n = max(int(spec["min_iterations"]), min(int(spec["max_iterations"]), n))
        n -= n % rounds if n >= rounds else 0
    full_s = n / full_rate + rounds * val_s + build_s
    sup_s = n / sup_rate + rounds * val_s + build_s
    share = full_s / (full_s + sup_s)
    return {"iterations": n, "val_interval": max(1, n // rounds), "seconds_left": round(seconds, 1),
            "predicted_s": {"full": round(full_s, 1), "sup": round(sup_s, 1)},
            "full_deadline": now + seconds * share}  # fmt: skip


def train_row(spec: dict[str, Any], row: str, plan: dict[str, Any], deadline: float) -> dict[str, Any]:
    """Train one row for ``plan["iterations"]`` iterations (stopped cleanly at ``deadline``)."""
    import logging

    from ignite.engine import Events

    from diffcl_algo.training.checkpoint import ModelSaver

    n, interval = plan["iterations"], plan["val_interval"]
    run_dir = Path(spec["work"]) / "runs" / row
    run_dir.mkdir(parents=True, exist_ok=True)
    overrides = {**spec["common"], **ROWS[row], **SPEEDS[spec["speed"]], "max_iterations": n,
                 "val_interval": interval, "ckpt_interval": interval,
                 "t_max": "$int(@max_iterations) / @train#epoch_length", "output_dir": str(run_dir)}  # fmt: skip
    start = time.perf_counter()
    trainer = _build(overrides, spec["cudnn_benchmark"])
    stopped = _add_deadline(trainer, deadline)
    log, every = logging.getLogger("gpu_paper_scale"), max(1, int(spec["log_every"]))
    first: dict[str, float] = {}

    def progress(engine: Any) -> None:
        i = engine.state.iteration
        first.setdefault("t", time.perf_counter())
        if i % every == 0:
            rate = (i - 1) / max(time.perf_counter() - first["t"], 1e-9)
            log.info("%s: iteration %d / %d, %.2f it/s, %.0f s left before the deadline", row, i, n, rate,
                     deadline - time.time())

    trainer.add_event_handler(Events.ITERATION_COMPLETED, progress)
    try:
        trainer.run()
    finally:
        trainer.close()
    saver = next((h for h in trainer.train_handlers if isinstance(h, ModelSaver)), None)
    seconds = time.perf_counter() - start
    done = int(trainer.state.iteration)
    best = saver is not None and saver.best_iteration >= 0
    result = {"iterations": done, "max_iterations": n, "val_interval": interval, "seconds": round(seconds, 1),
              "its_per_s": round(done / seconds, 3) if seconds else None, "stopped_at_deadline": stopped["stopped"],
              "best_metric": round(float(saver.best_metric), 4) if best else None,
              "selected_iteration": int(saver.best_iteration) if best else None, "peak_gib": _peak_gib()}  # fmt: skip
    del trainer
    _release()
    return result


def environment() -> dict[str, Any]:
    """torch, the GPU, whether mamba-ssm's kernel imports, and which monai (the carried one?)."""
    import monai
    import torch

    from diffcl_algo.networks.ssm import MAMBA_SSM_AVAILABLE

    cuda = torch.cuda.is_available()
    return {"torch": torch.__version__, "cuda": cuda, "gpu": torch.cuda.get_device_name(0) if cuda else None,
            "mamba_ssm_kernel": bool(MAMBA_SSM_AVAILABLE), "monai": monai.__version__,
            "monai_path": monai.__file__}  # fmt: skip


def worker(spec_path: str) -> dict[str, Any]:
    """Throughput, sizing and the two trainings, in one process (``--worker``); writes ``spec["result"]`` after
    each step."""
    import logging

    import torch

    logging.basicConfig(level=logging.INFO, stream=sys.stdout, force=True,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")  # fmt: skip
    spec = json.loads(Path(spec_path).read_text())
    result: dict[str, Any] = {"environment": environment(), "throughput": [], "runs": {}, "errors": []}
    path = Path(spec["result"])
    say = logging.getLogger("gpu_paper_scale").info
    say("environment: %s", result["environment"])
    write_json(path, result)

    def step(name: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as err:  # record and go on: the other measurements and runs still count
            result["errors"].append(f"{name}: {type(err).__name__}: {err}")
            say("%s failed:\n%s", name, traceback.format_exc())
            return None
        finally:
            write_json(path, result)

    settings = speed_settings(spec["cudnn_benchmark_mode"], torch.cuda.is_available())
    for speed, benchmark in settings if spec["throughput_iters"] > 0 else []:
        for row in ROWS:
            if time.time() > spec["throughput_deadline"]:
                result["throughput"].append({"name": f"{row}_{speed}", "skipped": "throughput time box"})
                continue
            timed_val = row == "full" and (speed, benchmark) == settings[1]  # one validation round, timed
            got = step(f"throughput {row} {speed}", measure, spec, row, speed, benchmark, timed_val)
            if got:
                result["throughput"].append(got)
                say("throughput %s: %s it/s (peak %s GiB)", got["name"], got.get("its_per_s"), got["peak_gib"])
    rates = {(t["speed"], t["cudnn_benchmark"], t["row"]): t["its_per_s"] for t in result["throughput"]
             if t.get("its_per_s")}  # fmt: skip
    speed, benchmark = choose_speed(settings, rates, spec["speed"], spec["cudnn_benchmark_mode"] == "on")
    spec.update(speed=speed, cudnn_benchmark=benchmark)
    full_rate = rates.get((speed, benchmark, "full"), spec["default_its_per_s"]["full"])
    sup_rate = rates.get((speed, benchmark, "sup"), spec["default_its_per_s"]["sup"])
    val_s = next((t["validation_s"] for t in result["throughput"] if "validation_s" in t), spec["default_validation_s"])
    build_s = max([t["build_s"] for t in result["throughput"] if "build_s" in t] or [10.0])
    sizing = plan_iterations(spec, full_rate, sup_rate, val_s, build_s, time.time())
    result["plan"] = {**sizing, "speed": speed, "cudnn_benchmark": benchmark,
                      "its_per_s": {"full": full_rate, "sup": sup_rate}, "validation_s": val_s, "build_s": build_s}
    say("plan: %s", result["plan"])
    write_json(path, result)
    for row, deadline in (("full", sizing["full_deadline"]), ("sup", spec["train_deadline"])):
        got = step(f"training {row}", train_row, spec, row, sizing, deadline)
        if got:
            result["runs"][row] = got
            say("trained %s: %s", row, got)
    write_json(path, result)
    return result


# ------------------------------------------------------------------------------------ scoring and outputs


def scores(eval_dir: Path) -> dict[str, Any]:
    """Mean and per-case metrics of one evaluation (imported here: the package's dependencies are carried)."""
    from diffcl_algo.evaluation.handlers import read_case_metrics

    return read_case_metrics(eval_dir)


def weight_files(run_dir: Path) -> dict[str, Path]:
    """``last`` (the validated CS of the final ``train_state.pt``: the mean teacher's average) and ``selected``
    (``model.pt``, the best validation round), those that exist."""
    import torch

    from diffcl_algo.training.checkpoint import validated_cs_weights

    found = {}
    state_file = run_dir / "train_state.pt"
    if state_file.exists():
        state = torch.load(state_file, map_location="cpu", weights_only=True)
        torch.save(validated_cs_weights(state), run_dir / "model_last.pt")
        found["last"] = run_dir / "model_last.pt"
    if (run_dir / "model.pt").exists():
        found["selected"] = run_dir / "model.pt"
    return found


def write_half_weights(weights: dict[str, Path], out: Path, part_mib: float, total_mib: float,
                       max_files: int) -> dict[str, Any]:  # fmt: skip
    """The weight sets of ``weights`` (in its order of priority) in float16, as many as fit in ``total_mib`` MiB and
    ``max_files`` files of at most ``part_mib`` MiB: one ``out/cs_weights_fp16.pt`` (``{name: state_dict}``), split
    into ``.partN`` files when larger (join: ``cat cs_weights_fp16.pt.part* > cs_weights_fp16.pt``)."""
    import torch

    half, left_out, size = {}, [], 0
    limit = int(part_mib * 2**20)
    for name, path in weights.items():
        sd = torch.load(path, map_location="cpu", weights_only=True)
        sd = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
        more = sum(v.numel() * v.element_size() for v in sd.values()) + 200 * len(sd)  # tensors, pickle overhead
        if size + more <= total_mib * 2**20 and math.ceil((size + more) / limit) <= max_files:
            half[name], size = sd, size + more
        else:
            left_out.append(name)
    if not half:
        return {"files": [], "keys": [], "left_out": left_out}
    whole = out / WEIGHTS_NAME
    torch.save(half, whole)
    size = whole.stat().st_size
    files = [whole.name]
    if size > limit:
        data = whole.read_bytes()
        whole.unlink()
        files = []
        for i in range(math.ceil(size / limit)):
            part = out / f"{WEIGHTS_NAME}.part{i}"
            part.write_bytes(data[i * limit : (i + 1) * limit])
            files.append(part.name)
    return {"files": files, "keys": list(half), "left_out": left_out, "mib": round(size / 2**20, 2),
            "join": f"cat {WEIGHTS_NAME}.part* > {WEIGHTS_NAME}" if len(files) > 1 else None}  # fmt: skip


def compare(full: dict[str, Any], sup: dict[str, Any]) -> dict[str, Any]:
    """Full Diff-CL minus supervised-only, case by case on the cases both scored."""
    common = sorted(set(full["cases"]) & set(sup["cases"]))
    out: dict[str, Any] = {"cases": len(common)}
    for metric in METRICS:
        diffs = [full["cases"][c][metric] - sup["cases"][c][metric] for c in common]
        finite = [d for d in diffs if math.isfinite(d)]
        better = sum(d > 0 for d in finite) if metric in ("dice", "jaccard") else sum(d < 0 for d in finite)
        worse = sum(d < 0 for d in finite) if metric in ("dice", "jaccard") else sum(d > 0 for d in finite)
        out[metric] = {"mean_diff": round(sum(finite) / len(finite), 4) if finite else None,
                       "full_better": better, "full_worse": worse}  # fmt: skip
    return out


def summary_markdown(summary: dict[str, Any]) -> str:
    """The summary as markdown: throughput, then the mean report-split metrics of each row and weights."""
    env = summary.get("environment", {})
    lines = [f"# Paper-scale LA run ({summary['date']})", "",
             f"torch {env.get('torch')}, GPU {env.get('gpu')}, mamba-ssm kernel: {env.get('mamba_ssm_kernel')}; "
             f"cases: {summary.get('split')}; {summary['seconds']} s in all", "",
             "| throughput | it/s | peak GiB |", "|---|---|---|"]  # fmt: skip
    for t in summary.get("throughput", []):
        lines.append(f"| {t['name']} | {t.get('its_per_s', t.get('skipped', 'failed'))} | {t.get('peak_gib')} |")
    plan = summary.get("plan", {})
    lines += ["", f"plan: {plan.get('iterations')} iterations per row at {plan.get('speed')} "
              f"(cudnn benchmark {plan.get('cudnn_benchmark')})", "",
              "| row | iterations (planned / done) | train s | weights | Dice | Jaccard | 95HD | ASD |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row, info in summary.get("rows", {}).items():
        train = info.get("train") or {}
        for kind in ("last", "selected"):
            mean = (info.get(kind) or {}).get("mean")
            cells = " | ".join(f"{mean[m]:.4f}" for m in METRICS) if mean else \
                f"not scored: {(info.get(kind) or {}).get('error', 'no weights')} | | |"
            stop = " (deadline)" if train.get("stopped_at_deadline") else ""
            lines.append(f"| {row} | {train.get('max_iterations')} / {train.get('iterations')}{stop} | "
                         f"{train.get('seconds')} | {kind} | {cells} |")
    for kind, diff in summary.get("comparison", {}).items():
        d = diff["dice"]
        lines.append(f"\n{kind}: full - sup Dice {d['mean_diff']:+.4f} over {diff['cases']} cases "
                     f"(full better on {d['full_better']}, worse on {d['full_worse']})")
    if summary.get("errors"):
        lines += ["", "errors:", *[f"- {e}" for e in summary["errors"]]]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--packed", default="data/LA_packed.npz", help="file written by experiments/pack_la.py pack")
    add_device_arguments(p, "/tmp/diffcl_gpu")
    p.add_argument("--num_labeled", type=int, default=8)
    p.add_argument("--num_test_holdout", type=int, default=16, help="report split: the last N cases of train.list")
    p.add_argument("--num_val_holdout", type=int, default=8, help="selection split: the N cases before it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget_s", type=float, default=550.0, help="the whole script ends within this many seconds")
    p.add_argument("--eval_s", type=float, default=75.0, help="time box of the evaluation phase")
    p.add_argument("--write_s", type=float, default=10.0, help="time kept for writing the outputs")
    p.add_argument("--throughput_s", type=float, default=130.0, help="time box of the throughput phase")
    p.add_argument("--throughput_iters", type=int, default=30, help="timed iterations per setting (0: no phase)")
    p.add_argument("--throughput_warmup", type=int, default=5, help="untimed iterations before them")
    p.add_argument("--cudnn_benchmark", choices=("auto", "on", "off"), default="auto",
                   help="auto: also measure cuDNN's autotuner (on CUDA) and train with it when faster")
    p.add_argument("--iterations", type=int, default=0, help="iterations per row (0: as many as fit)")
    p.add_argument("--min_iterations", type=int, default=200)
    p.add_argument("--max_iterations", type=int, default=8000)
    p.add_argument("--val_rounds", type=int, default=4, help="validations (and checkpoints) per run")
    p.add_argument("--safety", type=float, default=0.92, help="share of the time left that sizing plans to use")
    p.add_argument("--num_workers", type=int, default=6, help="data-loader workers (training, evaluation)")
    p.add_argument("--sw_batch_size", type=int, default=4, help="sliding windows per forward (validation, evaluation)")
    p.add_argument("--log_every", type=int, default=100)
    p.add_argument("--unpack_workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--part_mib", type=float, default=15.5, help="largest weight file returned")
    p.add_argument("--weights_mib", type=float, default=60.0, help="weights returned in all (the device: 64 MiB)")
    p.add_argument("--poll", type=float, default=30.0, help="seconds between progress lines")
    p.add_argument("--set", default="", help="extra bundle overrides, 'id=value' pairs (toy runs)")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _split(data_dir: Path, args: argparse.Namespace) -> dict[str, int]:
    cases = [c for c in (data_dir / "train.list").read_text().split() if c]
    pool = len(cases) - args.num_test_holdout - args.num_val_holdout
    return {"labeled": args.num_labeled, "unlabeled": pool - args.num_labeled, "selection": args.num_val_holdout,
            "report": args.num_test_holdout}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the phases; returns the summary also written to ``<out>/summary.json``."""
    args = parse_args(argv)
    if args.worker:
        return worker(args.worker)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` / a device time limit: clean up children
    work, out = Path(args.work).resolve(), Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    wall0 = time.time()
    summary: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "errors": [], "phases": {}}
    log_files: list[tuple[str, Path]] = []
    with open(out / "progress.log", "w") as log:
        clock = Clock(log)
        clock.say(f"paper-scale LA run: packed {args.packed}, work {work}, out {out}, budget {args.budget_s:.0f} s")
        try:
            _run(args, work, out, clock, wall0, summary, log_files)
        except Exception as err:  # still write what there is
            summary["errors"].append(f"{type(err).__name__}: {err}")
            clock.say(f"stopped by an error:\n{traceback.format_exc()}")
        summary["seconds"] = round(clock.elapsed(), 1)
        with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:  # one file: the device returns at most eight
            for arcname, path in log_files:
                if path.exists():
                    tar.add(path, arcname=arcname)
        write_json(out / "summary.json", summary)
        (out / "summary.md").write_text(summary_markdown(summary))
        clock.say(f"done in {clock.elapsed():.0f} s: {sorted(p.name for p in out.iterdir())}\n"
                  f"{summary_markdown(summary)}")
    return summary


def _run(args: argparse.Namespace, work: Path, out: Path, clock: Clock, wall0: float, summary: dict[str, Any],
         log_files: list[tuple[str, Path]]) -> None:  # fmt: skip
    """The phases; fills ``summary`` and ``log_files`` as it goes (a failure keeps what was done)."""
    t = clock.elapsed()
    summary["site"] = install_wheels(Path(args.wheels), work / "site", clock)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(work / "site"), str(REPO), os.environ.get(
        "PYTHONPATH", "")]), "PYTHONUNBUFFERED": "1"}
    sys.path[:0] = [str(REPO), str(EXPERIMENTS)]
    import pack_la  # here, after the packages: it needs monai

    data_dir = work / "LA"
    summary["unpack"] = pack_la.unpack(args.packed, str(data_dir), workers=args.unpack_workers, compress=False)
    clock.say(f"unpacked {summary['unpack']['cases']} cases in {summary['unpack']['seconds']} s")
    summary["phases"]["setup_s"] = round(clock.elapsed() - t, 1)
    summary["split"] = _split(data_dir, args)

    common = {"dataset_dir": str(data_dir), "num_labeled": args.num_labeled, "num_test_holdout": args.num_test_holdout,
              "num_val_holdout": args.num_val_holdout, "normalize_intensity": True, "patch_size": [112, 112, 80],
              "n_filters": 16, "seed": args.seed, "progress": False, "log_every": args.log_every,
              "num_workers": args.num_workers, "sw_batch_size": args.sw_batch_size, "check_data": True,
              "validate#additional_metrics": {}, **parse_set(args.set)}  # fmt: skip
    summary["overrides"] = {k: v for k, v in common.items() if k != "dataset_dir"}
    train_end = args.budget_s - args.eval_s - args.write_s  # seconds since the start
    spec = {"work": str(work), "common": common, "result": str(work / "worker.json"), "speed": "bf16_cl",
            "cudnn_benchmark_mode": args.cudnn_benchmark, "throughput_iters": args.throughput_iters,
            "throughput_warmup": args.throughput_warmup, "iterations": args.iterations,
            "min_iterations": args.min_iterations, "max_iterations": args.max_iterations,
            "val_rounds": args.val_rounds, "safety": args.safety, "log_every": args.log_every,
            "throughput_deadline": time.time() + args.throughput_s, "train_deadline": wall0 + train_end - 10,
            "default_its_per_s": {"full": 4.0, "sup": 10.0}, "default_validation_s": 15.0}  # fmt: skip
    write_json(work / "spec.json", spec)
    worker_log = work / "worker.log"
    log_files.append(("worker.log", worker_log))
    clock.say(f"worker: throughput (box {args.throughput_s:.0f} s), sizing, training until +{train_end - 10:.0f} s")
    t = clock.elapsed()
    ran = run_parallel({"worker": ([sys.executable, str(Path(__file__).resolve()), "--worker", str(work / "spec.json")],
                                   worker_log)}, max(10.0, train_end + 15 - clock.elapsed()), clock, env, args.poll)
    summary["phases"]["worker_s"] = round(clock.elapsed() - t, 1)
    result = json.loads((work / "worker.json").read_text()) if (work / "worker.json").exists() else {}
    summary["environment"] = result.get("environment", {"error": "the worker did not start"})
    clock.say(f"environment (the worker's): {summary['environment']}")
    summary["worker"] = ran["worker"]
    summary["throughput"] = result.get("throughput", [])
    summary["plan"] = {k: v for k, v in result.get("plan", {}).items() if k != "full_deadline"}
    summary["errors"] += result.get("errors", [])
    if ran["worker"]["rc"] != 0:
        summary["errors"].append(f"worker: {'stopped at its time box' if ran['worker']['timed_out'] else 'failed'} "
                                 f"(exit {ran['worker']['rc']}): {_last_line(worker_log)}")

    rows, eval_jobs, weights = {}, {}, {}
    for row in ROWS:
        run_dir = work / "runs" / row
        rows[row] = {"train": result.get("runs", {}).get(row)}
        for name in ("train.log", "metrics.csv"):
            log_files.append((f"{row}/{name}", run_dir / name))
        found = weight_files(run_dir) if run_dir.exists() else {}
        if rows[row]["train"] is None and (run_dir / "train_state.pt").exists():
            import torch

            state = torch.load(run_dir / "train_state.pt", map_location="cpu", weights_only=True)
            rows[row]["train"] = {"iterations": int(state["iteration"]), "stopped_at_deadline": True,
                                  "max_iterations": summary["plan"].get("iterations"),
                                  "selected_iteration": int(state.get("best_iteration", -1))}  # fmt: skip
        shared = {k: v for k, v in {**common, **ROWS[row], **SPEEDS[result.get("plan", {}).get("speed", "bf16_cl")]
                                    }.items() if k in EVAL_IDS}  # fmt: skip
        for kind, path in found.items():
            weights[f"{row}_{kind}"] = path
            eval_dir = run_dir / f"eval_{kind}"
            overrides = {**shared, "ckpt_path": str(path), "output_dir": str(eval_dir)}
            eval_jobs[f"{row}_{kind}"] = (bundle_command("evaluating", EVALUATE, overrides),
                                          run_dir / f"eval_{kind}.log")
            log_files += [(f"{row}/eval_{kind}.log", run_dir / f"eval_{kind}.log"),
                          (f"{row}/eval_{kind}_metrics.csv", eval_dir / "metrics.csv")]
    summary["rows"] = rows
    if weights:  # priority: full Diff-CL's selected and last weights, then supervised-only's
        order = sorted(weights, key=lambda k: (not k.startswith("full"), not k.endswith("selected")))
        summary["weights"] = write_half_weights({k: weights[k] for k in order}, out, args.part_mib, args.weights_mib,
                                                MAX_OUT_FILES - 4)  # summary.json, summary.md, progress.log, logs
        clock.say(f"CS weights in half precision: {summary['weights']}")
    eval_box = max(10.0, args.budget_s - args.write_s - clock.elapsed())
    clock.say(f"evaluating {sorted(eval_jobs)} on the report split at once, time box {eval_box:.0f} s")
    t = clock.elapsed()
    evaluated = run_parallel(eval_jobs, eval_box, clock, env, args.poll)
    summary["phases"]["eval_s"] = round(clock.elapsed() - t, 1)
    for row in ROWS:
        run_dir = work / "runs" / row
        for kind in ("last", "selected"):
            done = evaluated.get(f"{row}_{kind}")
            if done is None:
                rows[row][kind] = {"error": "no weights written"}
            elif done["rc"] != 0 or done["timed_out"]:
                rows[row][kind] = {"error": f"evaluation {'timed out' if done['timed_out'] else 'failed'}",
                                   "log_tail": _last_line(run_dir / f"eval_{kind}.log"), **done}  # fmt: skip
            else:
                rows[row][kind] = {**scores(run_dir / f"eval_{kind}"), "eval": done}
    summary["comparison"] = {kind: compare(rows["full"][kind], rows["sup"][kind]) for kind in ("last", "selected")
                             if "cases" in rows["full"][kind] and "cases" in rows["sup"][kind]}  # fmt: skip


if __name__ == "__main__":
    main()
