"""What ``L_cl`` pulls and pushes: the hidden labels of its top-k positives and negatives (eq. 12-13) in trained runs.

``L_cl`` can only propagate labels where it pulls an unlabeled voxel of class ``gamma`` that the CS gets wrong towards
the class-``gamma`` anchors. For the end state of a run (``train_state.pt``: CS, projection heads, memory bank, mean
teacher) this draws training batches of the run's own split (labeled + unlabeled random crops, the training
transforms, the CS in training mode as in an iteration), ``q`` random unlabeled voxels per batch as the trainer does,
``p`` anchors per class from the stored bank, the positives and negatives of ``ContrastiveLabelPropagationLoss`` (the
run's ``cl_select``; with ``pseudo_label`` the mean teacher's labels of the unlabeled crops) and counts, against the
unlabeled cases' hidden labels (never trained on):

* ``purity``: share of class-``gamma`` positives whose hidden label is ``gamma``;
* ``cs_right``: share of positives that the CS already predicts as ``gamma`` and truly are ``gamma``;
* ``corrective``: share of positives that truly are ``gamma`` while the CS predicts another class (where pulling
  helps); ``wrong``: share whose hidden label is another class (where pulling teaches the wrong class);
* ``neg_true``: share of negatives whose hidden label is ``gamma`` (true members pushed away);
* ``share``: share of class ``gamma`` among the ``q`` voxels (what a random choice of positives would hit);
* ``cs_err_all``: share of all ``q`` voxels that the CS gets wrong (the room), and ``teacher_err_all`` the mean
  teacher's (the pseudo-labels that the cross pseudo-supervision already trains on).

    python experiments/cl_positives.py --runs "runs/t6mt/full/l4_s0 runs/t6mt/full_sh/l4_s0" --batches 32
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import fire
import numpy as np
import torch
import yaml
from monai.bundle import ConfigParser

from diffcl_algo.contrastive import ClassMemoryBank, ContrastiveLabelPropagationLoss, project_voxels
from diffcl_algo.data import train_transforms
from diffcl_algo.data.transforms import HIDDEN_LABEL
from diffcl_algo.losses import class_argmax

REPO = Path(__file__).resolve().parents[1]
TRAIN = [str(REPO / "bundles/la/configs/train.yaml"), str(REPO / "bundles/la/configs/cpu.yaml")]
ROW_SWITCHES = {"use_cps": "true", "use_hfm": "true", "use_cl": "true"}
KEYS = ("purity", "cs_right", "corrective", "wrong", "neg_true")


def _parser(run_dir: Path) -> ConfigParser:
    summary = json.loads((run_dir / "summary.json").read_text())
    parser = ConfigParser()
    parser.read_config(TRAIN)
    overrides = {**ROW_SWITCHES, "num_labeled": summary["num_labeled"], "seed": summary["seed"],
                 "report_fold": summary["fold"], **summary["overrides"], "monitor_pseudo_labels": "true"}  # fmt: skip
    for key, value in overrides.items():
        parser[key] = yaml.safe_load(value) if isinstance(value, str) else value
    return parser


def _batches(parser: ConfigParser, count: int, seed: int):
    """``count`` batches of (2 labeled crops, 2 unlabeled crops with hidden labels) from the run's own split."""
    splits = parser.get_parsed_content("data#splits")
    patch = parser.get_parsed_content("patch_size")
    lab = train_transforms(patch, keys=("image", "label"), normalize=True)
    unl = train_transforms(patch, keys=("image", HIDDEN_LABEL), normalize=True)
    lab.set_random_state(seed)
    unl.set_random_state(seed + 1)
    rng = np.random.default_rng(seed)
    for _ in range(count):
        items = [lab(splits.labeled[i]) for i in rng.choice(len(splits.labeled), 2)]
        items += [unl(splits.unlabeled[i]) for i in rng.choice(len(splits.unlabeled), 2)]
        x = torch.stack([torch.as_tensor(it["image"]).as_subclass(torch.Tensor) for it in items])
        y = torch.stack([torch.as_tensor(it[HIDDEN_LABEL]).as_subclass(torch.Tensor) for it in items[2:]]).long()
        yield x, y


def measure(run_dir: str, batches: int = 32, seed: int = 0) -> dict:
    """The shares of the module docstring for one run (mean over batches, per class)."""
    run = REPO / run_dir
    state = torch.load(run / "train_state.pt", map_location="cpu", weights_only=True)
    parser = _parser(run)
    cs = parser.get_parsed_content("network_def")
    cs.load_state_dict(state["cs_network"])
    teacher = parser.get_parsed_content("network_def")
    teacher.load_state_dict({k[len("module.") :]: v for k, v in state["cs_ema"].items() if k.startswith("module.")})
    head = parser.get_parsed_content("nets#cs_head_def")
    head.load_state_dict(state["cs_head"])
    num_classes, capacity, dim = state["memory_bank"]["features"].shape
    bank = ClassMemoryBank(num_classes, dim, capacity)
    bank.load_state_dict(state["memory_bank"])
    loss = ContrastiveLabelPropagationLoss(parser.get_parsed_content("cl_tau"), parser.get_parsed_content("cl_top_k"))
    q, p = parser.get_parsed_content("cl_num_unlabeled"), parser.get_parsed_content("cl_num_anchors")
    by_pseudo_label = parser.get_parsed_content("cl_select") == "pseudo_label"
    gen = torch.Generator().manual_seed(seed)
    cs.train()
    teacher.train()
    head.train()
    shares: dict[str, list[list[float]]] = {k: [[] for _ in range(bank.num_classes)] for k in (*KEYS, "share")}
    errors: dict[str, list[float]] = {"cs_err_all": [], "teacher_err_all": []}
    with torch.no_grad():
        for x, y in _batches(parser, batches, seed):
            logits, feat = cs(x, return_features=True)
            pred_t = class_argmax(teacher(x[2:])).reshape(-1)  # Y^u: the mean teacher on the unlabeled crops
            pred = class_argmax(logits[2:]).reshape(-1)
            labels = y.reshape(-1)
            pick = torch.randperm(labels.numel(), generator=gen)[:q]
            b = project_voxels(head, feat[2:], pick, contextlib.nullcontext)
            lab, prd = labels[pick], pred[pick]
            errors["cs_err_all"].append(float((prd != lab).float().mean()))
            errors["teacher_err_all"].append(float((pred_t[pick] != lab).float().mean()))
            for c, anchors in enumerate(bank.sample(p, generator=gen)):
                if anchors is None:  # the class never entered the bank: L_cl skipped it too
                    continue
                pos, neg = loss.select(anchors, b, (pred_t[pick] == c) if by_pseudo_label else None)
                true, right = lab[pos] == c, prd[pos] == c
                values = {
                    "purity": true.float().mean(),
                    "cs_right": (true & right).float().mean(),
                    "corrective": (true & ~right).float().mean(),
                    "wrong": (~true).float().mean(),
                    "neg_true": (lab[neg] == c).float().mean(),
                    "share": (lab == c).float().mean(),
                }
                for k, v in values.items():
                    shares[k][c].append(float(v))
    out = {k: [round(float(np.mean(v)), 4) if v else None for v in per_class] for k, per_class in shares.items()}
    out.update({k: round(float(np.mean(v)), 4) for k, v in errors.items()})
    return out


def main(runs: str, batches: int = 32, seed: int = 0) -> None:
    """Print the shares of every run in ``runs`` (space-separated run folders), one JSON line each."""
    for run_dir in str(runs).split():
        print(json.dumps({"run": run_dir, **measure(run_dir, batches, seed)}), flush=True)


if __name__ == "__main__":
    fire.Fire(main)
