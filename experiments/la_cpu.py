"""Run and tabulate the reduced CPU protocol on LA (docs/results.md): every row scored on the report split.

Each run trains one row, then evaluates both its last weights and its selected ``model.pt`` on the report split (the
last ``num_test_holdout`` cases of train.list, never used to train or select) with the bundle's ``evaluating``
workflow, and writes ``summary.json``. ``table`` puts the rows side by side, mean and std over seeds.

    python experiments/la_cpu.py run reference --num_labeled 8 --seed 0
    python experiments/la_cpu.py run sup --num_labeled 8 --seed 0 --set "sup_loss=field dropout=0.5"
    python experiments/la_cpu.py table --rows "reference sup"
    python experiments/la_cpu.py cases --rows "reference sup" --num_labeled 8 --seed 0
    python experiments/la_cpu.py monitor --rows "full cps" --num_labeled 8 --seed 0

Rows: ``reference`` (the field's supervised recipe, ``experiments/reference_supervised.py``) and the Table 6 rows
``sup``, ``cps``, ``cps_hfm``, ``full`` of the bundle; ``--set`` adds bundle overrides (``id=value`` pairs) and
``--name`` names the result folder (default: the row).
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))

from reference_supervised import train_reference  # noqa: E402

TRAIN = [str(REPO / "bundles/la/configs/train.yaml"), str(REPO / "bundles/la/configs/cpu.yaml")]
EVALUATE = [str(REPO / "bundles/la/configs/evaluate.yaml"), str(REPO / "bundles/la/configs/cpu.yaml")]
#: Table 6 rows as bundle switches.
ROWS = {
    "sup": {"use_cps": "false", "use_hfm": "false", "use_cl": "false"},
    "cps": {"use_cps": "true", "use_hfm": "false", "use_cl": "false"},
    "cps_hfm": {"use_cps": "true", "use_hfm": "true", "use_cl": "false"},
    "full": {"use_cps": "true", "use_hfm": "true", "use_cl": "true"},
}
#: Network / data ids that evaluation must share with training.
SHARED_IDS = ("use_hfm", "residual", "normalize_intensity", "n_filters", "norm", "dataset_dir")
METRICS = ("dice", "jaccard", "hd95", "asd")


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


def _last_weights(run_dir: Path) -> Path:
    """``model_last.pt``: the CS weights of the final ``train_state.pt``."""
    state = torch.load(run_dir / "train_state.pt", map_location="cpu", weights_only=True)
    path = run_dir / "model_last.pt"
    torch.save(state["cs_network"], path)
    return path


def _scores(eval_dir: Path) -> dict:
    summary = json.loads((eval_dir / "metrics_summary.json").read_text())
    cases = {}
    for line in (eval_dir / "metrics.csv").read_text().splitlines()[1:]:
        name, *values = line.split(",")
        cases[name] = dict(zip(METRICS, map(float, values)))
    return {"mean": {m: summary["metrics"][m]["mean"] for m in METRICS}, "cases": cases}


def run(row: str, num_labeled: int = 8, seed: int = 0, set: str = "", name: str = "", root: str = "runs/cpu") -> None:
    """Train one row and score its last and selected weights on the report split (``summary.json``)."""
    extra = _parse_set(set)
    run_dir = REPO / root / (name or row) / f"l{num_labeled}_s{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    common = {"num_labeled": num_labeled, "seed": seed, **extra}
    weights = {}
    if row == "reference":
        weights["last"] = Path(train_reference(TRAIN, str(run_dir), overrides=common))
        shared = {"use_hfm": "false", "residual": "false"}
    elif row in ROWS:
        _bundle("training", TRAIN, {**ROWS[row], **common, "output_dir": str(run_dir)}, run_dir / "train.out")
        weights["last"], weights["selected"] = _last_weights(run_dir), run_dir / "model.pt"
        shared = {}
    else:
        raise ValueError(f"unknown row {row!r}; known: reference, {', '.join(ROWS)}")
    shared = {**{k: v for k, v in {**ROWS.get(row, {}), **common}.items() if k in SHARED_IDS}, **shared}
    summary = {"row": row, "name": name or row, "num_labeled": num_labeled, "seed": seed, "overrides": extra}
    for kind, path in weights.items():
        eval_dir = run_dir / f"eval_{kind}"
        _bundle("evaluating", EVALUATE, {**shared, "ckpt_path": str(path), "output_dir": str(eval_dir)},
                run_dir / f"eval_{kind}.out")
        summary[kind] = _scores(eval_dir)
    state_file = run_dir / "train_state.pt"
    if state_file.exists():
        state = torch.load(state_file, map_location="cpu", weights_only=True)
        summary["selected_iteration"] = int(state.get("best_iteration", -1))
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: summary[k]["mean"] for k in weights}, indent=1))


def table(rows: str = "", root: str = "runs/cpu", metric: str = "dice") -> str:
    """Markdown table of the named result folders: mean +- sample std over seeds and the per-seed values."""
    lines = [f"| row | labeled | weights | seeds | {metric} mean ± std | per seed |", "|---|---|---|---|---|---|"]
    for name in str(rows).split() or sorted(p.name for p in (REPO / root).iterdir()):
        summaries = [json.loads(p.read_text()) for p in sorted((REPO / root / name).glob("l*_s*/summary.json"))]
        for labeled in sorted({s["num_labeled"] for s in summaries}, reverse=True):
            group = sorted((s for s in summaries if s["num_labeled"] == labeled), key=lambda s: s["seed"])
            for kind in ("last", "selected"):
                values = [s[kind]["mean"][metric] for s in group if kind in s]
                if not values:
                    continue
                spread = f"± {np.std(values, ddof=1):.3f}" if len(values) > 1 else "(one seed)"
                per_seed = ", ".join(f"s{s['seed']} {s[kind]['mean'][metric]:.3f}" for s in group if kind in s)
                lines.append(f"| {name} | {labeled} | {kind} | {len(values)} | {np.mean(values):.3f} {spread} "
                             f"| {per_seed} |")
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
    fire.Fire({"run": run, "table": table, "cases": cases, "monitor": monitor})
