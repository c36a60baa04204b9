"""Run and tabulate the reduced CPU protocol on LA (docs/results.md): every row scored on the report split.

Each run trains one row, then evaluates both its last weights and its selected ``model.pt`` on the report split (the
last ``num_test_holdout`` cases of train.list, never used to train or select) with the bundle's ``evaluating``
workflow, and writes ``summary.json``. ``table`` puts the rows side by side, mean and std over seeds.

    python experiments/la_cpu.py run reference --num_labeled 8 --seed 0
    python experiments/la_cpu.py run sup --num_labeled 8 --seed 0 --set "sup_loss=field dropout=0.5"
    python experiments/la_cpu.py table --rows "reference sup"
    python experiments/la_cpu.py cases --rows "reference sup" --num_labeled 8 --seed 0
    python experiments/la_cpu.py run full --num_labeled 8 --seed 0 --monitor    # + experiments/monitor.yaml
    python experiments/la_cpu.py monitor --rows "full cps" --num_labeled 8 --seed 0
    python experiments/la_cpu.py run full --num_labeled 4 --seed 1 --fold 2      # report on the 3rd block from the end
    python experiments/la_cpu.py compare full sup --num_labeled 4               # paired, over every seed and fold
    python experiments/la_cpu.py curve "sup_avg_i1280 sup_avg_i3072" --root runs/long  # Dice vs CPU minutes
    python experiments/la_cpu.py average full_ema --num_labeled 4 --seed 0     # an ema_decay run's student, too

Rows: ``reference`` (the field's supervised recipe, ``experiments/reference_supervised.py``), the Table 6 rows ``sup``
(classic: no weight average), ``cps``, ``cps_hfm``, ``full`` of the bundle, and ``sup_avg`` (supervised-only with the
same weight average as the Diff-CL rows, the fair baseline); ``--monitor`` attaches ``experiments/monitor.yaml`` (the
pseudo-label monitor) to a training run; ``--set`` adds bundle overrides (``id=value`` pairs) and ``--name`` names the
result folder (default: the row). ``--fold k`` rotates the report split (``report_fold``: the k-th block of 16 cases
from the end of train.list; 5 folds report on every case once); its results go to ``l<labeled>_s<seed>_f<k>`` (fold 0:
``l<labeled>_s<seed>``). ``compare`` pairs two rows case by case over every seed and fold both have.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import fire
import numpy as np
import torch
import yaml

from diffcl_algo.evaluation.handlers import read_case_metrics
from diffcl_algo.training.checkpoint import validated_cs_weights

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))

from reference_supervised import train_reference  # noqa: E402

TRAIN = [str(REPO / "bundles/la/configs/train.yaml"), str(REPO / "bundles/la/configs/cpu.yaml")]
EVALUATE = [str(REPO / "bundles/la/configs/evaluate.yaml"), str(REPO / "bundles/la/configs/cpu.yaml")]
MONITOR = str(REPO / "experiments/monitor.yaml")
#: evaluation of ``reference``: its network (plain V-Net stages, no HF-Mamba)
REFERENCE_EVAL = str(REPO / "experiments/reference.yaml")
#: Table 6 rows as bundle switches; ``sup`` is the classic supervised-only row, without the weight average.
SUPERVISED = {"use_cps": "false", "use_hfm": "false", "use_cl": "false"}
ROWS = {
    "sup": {**SUPERVISED, "ema_decay": "0.0"},
    "sup_avg": SUPERVISED,
    "cps": {"use_cps": "true", "use_hfm": "false", "use_cl": "false"},
    "cps_hfm": {"use_cps": "true", "use_hfm": "true", "use_cl": "false"},
    "full": {"use_cps": "true", "use_hfm": "true", "use_cl": "true"},
}
#: Network / data ids that evaluation must share with training.
SHARED_IDS = ("use_hfm", "hfm_stages", "normalize_intensity", "n_filters", "dataset_dir", "report_fold")
#: What ``average`` scores besides ``last``: the student's own weights, the average with the student's BN statistics.
AVERAGE_KINDS = ("student", "average_student_bn")


def _parse_set(pairs: str) -> dict[str, str]:
    out = {}
    for pair in str(pairs or "").split():
        if "=" not in pair:
            raise ValueError(f"--set expects id=value pairs separated by spaces, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key] = value
    return out


def bundle_command(workflow: str, configs: list[str], overrides: dict[str, Any]) -> list[str]:
    """``python -m monai.bundle run <workflow> --config_file <configs> --<id> <value> ...`` (run from ``REPO``)."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", workflow, "--config_file", str(configs)]
    for key, value in overrides.items():
        cmd += [f"--{key}", str(value)]
    return cmd


def _bundle(workflow: str, configs: list[str], overrides: dict[str, str], log: Path) -> None:
    with open(log, "w") as f:
        cmd = bundle_command(workflow, configs, overrides)
        done = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"{workflow} failed (exit {done.returncode}); see {log}")


def _last_weights(run_dir: Path, network: str = "cs_network") -> Path:
    """``model_last.pt`` (``model_ds_last.pt``): the CS (DS) weights of the final ``train_state.pt``; with
    ``ema_decay`` the CS is its average, the network that validation scores and ``model.pt`` holds."""
    state = torch.load(run_dir / "train_state.pt", map_location="cpu", weights_only=True)
    path = run_dir / ("model_last.pt" if network == "cs_network" else "model_ds_last.pt")
    torch.save(validated_cs_weights(state) if network == "cs_network" else state[network], path)
    return path


def run_folder(num_labeled: int, seed: int, fold: int = 0) -> str:
    """``l<labeled>_s<seed>`` (fold 0, the report split of docs/results.md) or ``l<labeled>_s<seed>_f<fold>``."""
    return f"l{num_labeled}_s{seed}" + (f"_f{fold}" if fold else "")


def _common(num_labeled: int, seed: int, fold: int, extra: dict[str, str]) -> dict[str, Any]:
    """The overrides of a run: its budget of labels, seed, report fold and ``--set`` pairs."""
    return {"num_labeled": num_labeled, "seed": seed, **({"report_fold": fold} if fold else {}), **extra}


def _shared(row: str, common: dict[str, Any]) -> dict[str, Any]:
    """The overrides of a run that its evaluation must share (``SHARED_IDS``)."""
    return {k: v for k, v in {**ROWS.get(row, {}), **common}.items() if k in SHARED_IDS}


def run(
    row: str,
    num_labeled: int = 8,
    seed: int = 0,
    set: str = "",
    name: str = "",
    root: str = "runs/cpu",
    fold: int = 0,
    ds_eval_steps: int = 0,
    monitor: bool = False,
    resume: bool = False,
) -> None:
    """Train one row and score its last and selected weights on the report split (``summary.json``); with
    ``ds_eval_steps`` also the DS's last weights alone (``ds_last``: DDIM from pure noise, that many steps); with
    ``monitor`` the training logs its pseudo-labels' Dice against the hidden labels (``experiments/monitor.yaml``);
    with ``resume`` a scored run is left as it is and an interrupted one continues from its ``train_state.pt`` (the
    bundle's exact resume; ``train.out`` then logs the continuation only)."""
    extra = _parse_set(set)
    run_dir = REPO / root / (name or row) / run_folder(num_labeled, seed, fold)
    if resume and (run_dir / "summary.json").exists():
        print(f"{run_dir / 'summary.json'} exists: nothing to resume")
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    common = _common(num_labeled, seed, fold, extra)
    if resume and row in ROWS and (run_dir / "train_state.pt").exists():
        common["resume"] = "true"
    weights, evaluate = {}, EVALUATE
    if row == "reference":
        weights["last"] = Path(train_reference(TRAIN, str(run_dir), overrides=common))
        evaluate = [*EVALUATE, REFERENCE_EVAL]
    elif row in ROWS:
        train = [*TRAIN, MONITOR] if monitor else TRAIN
        _bundle("training", train, {**ROWS[row], **common, "output_dir": str(run_dir)}, run_dir / "train.out")
        weights["last"], weights["selected"] = _last_weights(run_dir), run_dir / "model.pt"
        if ds_eval_steps and row != "sup":
            weights["ds_last"] = _last_weights(run_dir, "ds_network")
    else:
        raise ValueError(f"unknown row {row!r}; known: reference, {', '.join(ROWS)}")
    shared = _shared(row, common)
    summary = {"row": row, "name": name or row, "num_labeled": num_labeled, "seed": seed, "fold": fold,
               "overrides": extra}  # fmt: skip
    for kind, path in weights.items():
        eval_dir = run_dir / f"eval_{kind}"
        ds = {"eval_network": "ds", "ds_eval_steps": ds_eval_steps, "seed": seed} if kind == "ds_last" else {}
        _bundle("evaluating", evaluate, {**shared, **ds, "ckpt_path": str(path), "output_dir": str(eval_dir)},
                run_dir / f"eval_{kind}.out")
        summary[kind] = read_case_metrics(eval_dir)
    state_file = run_dir / "train_state.pt"
    if state_file.exists():
        state = torch.load(state_file, map_location="cpu", weights_only=True)
        summary["selected_iteration"] = int(state.get("best_iteration", -1))
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: summary[k]["mean"] for k in weights}, indent=1))


def _is_bn_statistic(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")


def average(name: str, num_labeled: int = 8, seed: int = 0, fold: int = 0, root: str = "runs/cpu") -> dict:
    """Score a run trained with ``ema_decay`` two more ways on its report split and add them to its ``summary.json``:
    ``student`` (the CS's own last weights; ``last`` scores their average) and ``average_student_bn`` (the average's
    weights with the student's batch-norm statistics; the same as ``last`` for runs of bundle version 0.4.0 on, whose
    average keeps the student's statistics). Returns the mean Dice of ``last`` and of both."""
    run_dir = REPO / root / name / run_folder(num_labeled, seed, fold)
    summary = json.loads((run_dir / "summary.json").read_text())
    state = torch.load(run_dir / "train_state.pt", map_location="cpu", weights_only=True)
    if not state.get("cs_ema"):
        raise ValueError(f"{run_dir / 'train_state.pt'} holds no average of the CS weights (trained without ema_decay)")
    student, avg = state["cs_network"], validated_cs_weights(state)
    kinds = dict(zip(AVERAGE_KINDS, (student, {k: (student if _is_bn_statistic(k) else avg)[k] for k in avg})))
    common = _common(num_labeled, seed, fold, summary["overrides"])
    for kind, weights in kinds.items():
        path, eval_dir = run_dir / f"model_{kind}.pt", run_dir / f"eval_{kind}"
        torch.save(weights, path)
        _bundle("evaluating", EVALUATE, {**_shared(summary["row"], common), "ckpt_path": str(path),
                                         "output_dir": str(eval_dir)}, run_dir / f"eval_{kind}.out")  # fmt: skip
        summary[kind] = read_case_metrics(eval_dir)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return {kind: round(summary[kind]["mean"]["dice"], 4) for kind in ("last", *kinds)}


def table(rows: str = "", root: str = "runs/cpu", metric: str = "dice") -> str:
    """Markdown table of the named result folders: mean +- sample std over seeds and the per-seed values (a seed's
    value: the mean over its report cases, every fold it ran pooled)."""
    lines = [f"| row | labeled | weights | seeds | cases | {metric} mean ± std | per seed |", "|---" * 7 + "|"]
    for name in str(rows).split() or sorted(p.name for p in (REPO / root).iterdir()):
        summaries = (REPO / root / name).glob("l*_s*/summary.json")
        labeled_counts = {json.loads(p.read_text())["num_labeled"] for p in summaries}
        for labeled in sorted(labeled_counts, reverse=True):
            for kind in ("last", "selected", "ds_last", *AVERAGE_KINDS):
                by_seed = _by_seed(name, labeled, kind, root, metric)
                if not by_seed:
                    continue
                values = {s: float(np.mean(list(c.values()))) for s, c in sorted(by_seed.items())}
                spread = f"± {np.std(list(values.values()), ddof=1):.3f}" if len(values) > 1 else "(one seed)"
                per_seed = ", ".join(f"s{s} {v:.3f}" for s, v in values.items())
                count = "/".join(str(len(c)) for c in by_seed.values())
                lines.append(f"| {name} | {labeled} | {kind} | {len(values)} | {count} | "
                             f"{np.mean(list(values.values())):.3f} {spread} | {per_seed} |")  # fmt: skip
    return "\n".join(lines)


def cases(rows: str, num_labeled: int = 8, seed: int = 0, weights: str = "last", root: str = "runs/cpu") -> str:
    """Markdown table of per-case Dice on the report split, one column per named result folder (one seed)."""
    names = str(rows).split()
    folder = f"l{num_labeled}_s{seed}"
    summaries = {n: json.loads((REPO / root / n / folder / "summary.json").read_text()) for n in names}
    case_names = sorted(next(iter(summaries.values()))[weights]["cases"])
    lines = ["| case | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for case in case_names:
        values = " | ".join(f"{summaries[n][weights]['cases'][case]['dice']:.3f}" for n in names)
        lines.append(f"| {case} | {values} |")
    return "\n".join(lines)


def _by_seed(
    name: str, num_labeled: int, weights: str, root: str, metric: str = "dice", folds: str = ""
) -> dict[int, dict[str, float]]:
    """``{seed: {case: value}}`` of a result folder, every fold of a seed pooled (a case is reported in one fold), or
    only the report folds named in ``folds`` (space-separated)."""
    out: dict[int, dict[str, float]] = {}
    keep = {int(k) for k in str(folds).split()}
    for path in sorted((REPO / root / name).glob(f"l{num_labeled}_s*/summary.json")):
        summary = json.loads(path.read_text())
        if weights in summary and (not keep or int(summary.get("fold", 0)) in keep):
            cases = {c: v[metric] for c, v in summary[weights]["cases"].items()}
            out.setdefault(int(summary["seed"]), {}).update(cases)
    return out


def compare(
    a: str,
    b: str = "sup_avg sup",
    num_labeled: int = 8,
    weights: str = "last",
    root: str = "runs/cpu",
    folds: str = "",
) -> str:
    """Paired comparison of row ``a`` with each row of ``b`` (space-separated; by default both supervised-only rows:
    with the same weight average as Diff-CL, the fair baseline, and the classic one), on the cases and seeds both
    have (every fold pooled, or the report folds named in ``folds``, e.g. ``--folds "0 1"``).

    Per seed: the mean Dice over the shared cases (mean +- sample std over seeds, and the difference per seed); per
    case: the difference ``a - b`` averaged over seeds: cases better / worse / equal, the mean and median difference
    and the two-sided Wilcoxon signed-rank test of those differences (scipy).
    """
    return "\n\n".join(_compare(a, row, num_labeled, weights, root, folds) for row in str(b).split())


def _compare(a: str, b: str, num_labeled: int, weights: str, root: str, folds: str = "") -> str:
    from scipy.stats import wilcoxon

    da, db = (_by_seed(r, num_labeled, weights, root, folds=folds) for r in (a, b))
    seeds = sorted(set(da) & set(db))
    if not seeds:
        raise ValueError(f"{a} and {b} share no seed at {num_labeled} labeled cases under {root}")
    cases = sorted(set.intersection(*(set(da[s]) & set(db[s]) for s in seeds)))
    mean = {r: [float(np.mean([d[s][c] for c in cases])) for s in seeds] for r, d in ((a, da), (b, db))}
    diff = np.array([np.mean([da[s][c] - db[s][c] for s in seeds]) for c in cases])
    std = {r: f" ± {np.std(v, ddof=1):.3f}" if len(v) > 1 else "" for r, v in mean.items()}
    lines = [
        f"{a} vs {b}, {num_labeled} labeled, {weights} weights: {len(cases)} cases x {len(seeds)} seeds {seeds}",
        f"| row | Dice mean{' ± std over seeds' if len(seeds) > 1 else ''} | per seed |",
        "|---|---|---|",
        *(f"| {r} | {np.mean(v):.3f}{std[r]} | {', '.join(f'{x:.3f}' for x in v)} |" for r, v in mean.items()),
        f"difference per seed: {', '.join(f'{x - y:+.3f}' for x, y in zip(mean[a], mean[b]))}",
        f"per case (mean over seeds): {a} better on {int((diff > 0).sum())}, worse on {int((diff < 0).sum())}, "
        f"equal on {int((diff == 0).sum())}; mean difference {diff.mean():+.3f}, median {np.median(diff):+.3f}",
    ]
    if np.any(diff != 0):
        lines.append(f"Wilcoxon signed-rank (two-sided) p = {wilcoxon(diff).pvalue:.3g}")
    return "\n".join(lines)


def train_minutes(run_dir: Path) -> float:
    """Minutes of a run's training engine (ignite's ``Engine run finished. Time taken`` line in ``train.out``)."""
    text = (run_dir / "train.out").read_text()
    lines = [ln for ln in text.splitlines() if "DiffCLTrainer" in ln and "finished" in ln]
    if not lines:
        raise ValueError(f"{run_dir / 'train.out'} records no finished training")
    h, m, sec = lines[-1].rsplit("Time taken: ", 1)[1].split(":")
    return int(h) * 60 + int(m) + float(sec) / 60


def curve(names: str, low: int = 8, high: int = 54, weights: str = "last", root: str = "runs/long") -> str:
    """Dice against CPU minutes: per result folder (one budget each, e.g. ``sup_avg_i3072``), the row at ``low`` and
    at ``high`` labeled cases (mean and median case, every seed and fold pooled), the training minutes of one run and
    the room ``high - low``."""
    cpu = yaml.safe_load((REPO / "bundles/la/configs/cpu.yaml").read_text())
    lines = [f"| budget | iterations | minutes / run (LA {low}, {high}) | LA {low} Dice (median) | "
             f"{high} labeled Dice (median) | room |", "|---" * 6 + "|"]  # fmt: skip
    for name in str(names).split():
        row, minutes, iterations = {}, [], None
        for labeled in (low, high):
            runs = sorted((REPO / root / name).glob(f"l{labeled}_s*"))
            values = [v for s in _by_seed(name, labeled, weights, root).values() for v in s.values()]
            if not values:
                raise ValueError(f"{root}/{name} has no scored run at {labeled} labeled cases")
            row[labeled] = (float(np.mean(values)), float(np.median(values)))
            minutes.append(np.mean([train_minutes(r) for r in runs]))
            summary = json.loads((runs[0] / "summary.json").read_text())
            iterations = summary["overrides"].get("max_iterations", cpu["max_iterations"])
        room = row[high][0] - row[low][0]
        lines.append(f"| {name} | {iterations} | {minutes[0]:.0f}, {minutes[1]:.0f} | {row[low][0]:.3f} "
                     f"({row[low][1]:.3f}) | {row[high][0]:.3f} ({row[high][1]:.3f}) | {room:+.3f} |")  # fmt: skip
    return "\n".join(lines)


MONITOR_TAGS = ("pseudo_dice_cs", "pseudo_dice_ds", "loss_cl", "loss_cps_cs", "loss_sup_cs")


def monitor(rows: str, num_labeled: int = 8, seed: int = 0, window: int = 128, root: str = "runs/cpu") -> str:
    """Per-window means of the logged pseudo-label Dice and loss terms (TensorBoard events) of training runs."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    blocks = []
    for name in str(rows).split():
        run_dir = REPO / root / name / f"l{num_labeled}_s{seed}"
        events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0}).Reload()
        tags = [t for t in MONITOR_TAGS if t in events.Tags()["scalars"]]
        series = {t: {e.step: e.value for e in events.Scalars(t)} for t in tags}
        last = max((max(v) for v in series.values() if v), default=0)
        lines = [f"{root}/{name}/l{num_labeled}_s{seed}", f"{'iters':>10}" + "".join(f"{t:>16}" for t in tags)]
        for start in range(1, last + 1, window):
            stop = min(start + window - 1, last)
            means = [np.mean([v for k, v in series[t].items() if start <= k <= stop] or [np.nan]) for t in tags]
            lines.append(f"{f'{start}-{stop}':>10}" + "".join(f"{m:>16.4f}" for m in means))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    fire.Fire({"run": run, "average": average, "table": table, "cases": cases, "monitor": monitor, "compare": compare,
               "curve": curve})
