"""The exponential moving average of the CS weights (``ema_decay``; not in the paper).

PyTorch's ``AveragedModel`` does the averaging and keeps the batch-norm statistics in step with the CS; this module
turns the bundle's ``ema_decay`` into one (or into nothing at 0), adds Mean Teacher's warm-up of the decay (PyTorch's
EMA function has none) and refuses a decay outside ``[0, 1)`` by the option's name.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

__all__ = ["warm_ema", "weight_ema"]

logger = logging.getLogger(__name__)


def warm_ema(decay: float) -> Callable[[list[torch.Tensor], list[torch.Tensor], torch.Tensor], None]:
    """``AveragedModel``'s ``multi_avg_fn``: ``w_ema <- d w_ema + (1 - d) w`` with ``d = min(decay, 1 - 1 / (n + 1))``
    after ``n`` averaged steps, as in Mean Teacher (Tarvainen and Valpola, 2017) and UA-MT: a uniform average of all
    weights so far until ``1 / (1 - decay)`` steps, so the early average does not stay near the initial weights."""

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n_averaged: torch.Tensor) -> None:
        torch._foreach_lerp_(averaged, current, 1.0 - min(decay, 1.0 - 1.0 / (float(n_averaged) + 1.0)))

    return update


def weight_ema(network: nn.Module, decay: float, max_iterations: Optional[int] = None) -> Optional[AveragedModel]:
    """An EMA copy of ``network``'s parameters (:func:`warm_ema`), or None.

    After each optimizer step ``DiffCLTrainer`` calls ``update_parameters(cs)`` (the first call copies the weights).
    The buffers, batch-norm statistics included, are not averaged but copied from the CS at each update: averaged
    statistics do not match averaged weights, and on a short run (the demo's 300 iterations) they made the average
    score 0.37 Dice where the CS scored 0.94 (docs/results.md). Polyak averaging of SGD's noisy last iterates; the
    mean teacher of UA-MT / BCP, which labels the unlabeled images (``DiffCLTrainer.cs_pseudo_labels``).

    Args:
        network: the CS network (not a DDP wrapper); it is deep-copied.
        decay: ``ema_decay``; 0: no average (None), else in (0, 1) (0.99 averages about the last 100 steps).
        max_iterations: the run's length, if known: a warning names ``ema_decay`` when its horizon ``1 / (1 - decay)``
            exceeds a tenth of it (the average then lags the CS by much of the run: on the 300-iteration demo the
            mean teacher at 0.99 left Diff-CL at 0.09 Dice, at 0.9 it reached 0.90; docs/results.md).

    Raises:
        ValueError: ``decay`` outside ``[0, 1)``.
    """
    decay = float(decay)
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1) (0: no average of the CS weights), got {decay}.")
    if decay == 0.0:
        return None
    horizon = 1.0 / (1.0 - decay)
    if max_iterations and horizon > max_iterations / 10:
        logger.warning(
            "ema_decay %s averages about the last %d iterations, over a tenth of max_iterations %d: the average (and "
            "the mean teacher) lags the CS by much of the run; a shorter run wants a smaller ema_decay.",
            decay, round(horizon), max_iterations,
        )
    return AveragedModel(network, multi_avg_fn=warm_ema(decay), use_buffers=False)
