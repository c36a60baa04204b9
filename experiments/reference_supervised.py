"""The field's supervised V-Net recipe (UA-MT 2019 / SSL4MIS ``train_fully_supervised_3D``), in this package's terms.

A plain PyTorch loop, written from the recipe's published description and independent of ``DiffCLTrainer``, so that
any row of the bundle can be put beside it on the same cases, patch, width, batch and budget:

- network: the field's V-Net with plain stages and ``Dropout3d(0.5)`` at the bottleneck and the last decoder map
  (``VNet(residual=False, dropout=0.5)``), batch norm;
- loss: ``0.5 * (CE + soft Dice of the foreground)`` (``DiceCELoss(include_background=False, squared_pred=True)``
  with weights 0.5 / 0.5, the field's ``dice_loss``);
- SGD lr 0.01, momentum 0.9, weight decay 1e-4, lr x 0.1 every 2500 iterations;
- augmentation: RandomRotFlip + RandomCrop (``diffcl_algo.data.train_transforms``), labeled cases only;
- the last weights are the model (``model.pt``); no validation, no selection.

The cases, patch, width, labeled batch, iterations and seed are read from the bundle configs (the same ids the
bundle's training reads), so the split is the bundle's: ``data#labeled``.
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.utils import set_determinism

from diffcl_algo.bundle.expressions import as_bool
from diffcl_algo.data import train_transforms
from diffcl_algo.losses import DiceCELoss
from diffcl_algo.networks import VNet
from diffcl_algo.training.checkpoint import atomic_save
from diffcl_algo.utils import derive_seed

logger = logging.getLogger("diffcl_algo.reference")

#: The recipe's fixed settings (UA-MT / SSL4MIS).
RECIPE = {"dropout": 0.5, "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4, "lr_step": 2500, "lr_gamma": 0.1}


def bundle_settings(config_files: Sequence[str], overrides: dict) -> dict:
    """The values the reference run shares with the bundle: labeled cases, patch, width, batch, budget, seed."""
    parser = ConfigParser()
    parser.read_config(list(config_files))
    parser.update(overrides)
    ids = ("patch_size", "n_filters", "labeled_batch_size", "max_iterations", "seed", "spacing", "num_classes",
           "in_channels", "normalize_intensity", "channels_last")
    out = {k: parser.get_parsed_content(k) for k in ids}
    out["labeled"] = parser.get_parsed_content("data#labeled")
    for flag in ("normalize_intensity", "channels_last"):
        out[flag] = as_bool(out[flag])
    return out


def train_reference(
    config_files: Sequence[str], output_dir: str, overrides: dict | None = None, log_every: int = 64
) -> str:
    """Train the field's supervised recipe on the bundle's labeled cases; returns the path of ``model.pt``.

    Args:
        config_files: the bundle's training configs (e.g. ``train.yaml`` and ``cpu.yaml``).
        output_dir: where ``model.pt`` (last weights, a ``VNet`` state_dict) is written.
        overrides: bundle ids to override (``dataset_dir``, ``num_labeled``, ``seed``, ``max_iterations`` ...).
        log_every: iterations between loss lines.
    """
    s = bundle_settings(config_files, dict(overrides or {}))
    seed, labeled = int(s["seed"]), s["labeled"]
    set_determinism(seed=seed)
    net = VNet(3, int(s["in_channels"]), int(s["num_classes"]), n_filters=int(s["n_filters"]), residual=False,
               dropout=RECIPE["dropout"])
    if s["channels_last"]:  # the bundle's memory-order option: same math, faster convolutions on CPU
        net = net.to(memory_format=torch.channels_last_3d)
    opt = torch.optim.SGD(net.parameters(), lr=RECIPE["lr"], momentum=RECIPE["momentum"],
                          weight_decay=RECIPE["weight_decay"])
    loss_fn = DiceCELoss(include_background=False, batch=True, squared_pred=True)
    transform = train_transforms(s["patch_size"], spacing=s["spacing"], normalize=s["normalize_intensity"])
    batch, iterations = int(s["labeled_batch_size"]), int(s["max_iterations"])
    order: list[int] = []
    net.train()
    for i in range(iterations):
        while len(order) < batch:  # per-pass random permutations of the labeled cases (the field's shuffling loader)
            order += np.random.default_rng(derive_seed(seed, 7, i)).permutation(len(labeled)).tolist()
        picked, order = order[:batch], order[batch:]
        images, labels = [], []
        for slot, j in enumerate(picked):
            transform.set_random_state(seed=derive_seed(seed, 2, i, slot))
            item = transform(dict(labeled[j]))
            images.append(torch.as_tensor(item["image"]))
            labels.append(torch.as_tensor(item["label"]))
        x, y = torch.stack(images).float(), torch.stack(labels).long()
        for group in opt.param_groups:
            group["lr"] = RECIPE["lr"] * RECIPE["lr_gamma"] ** (i // RECIPE["lr_step"])
        loss = loss_fn(net(x), y, ce_weight=0.5, dice_weight=0.5)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (i + 1) % log_every == 0 or i + 1 == iterations:
            logger.info(f"reference iteration {i + 1}/{iterations} loss {loss.item():.4f}")
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "model.pt")
    atomic_save(net.state_dict(), path)
    return path
