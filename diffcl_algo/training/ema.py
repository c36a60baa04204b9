"""The exponential moving average of the CS weights (``ema_decay``; not in the paper).

PyTorch's ``AveragedModel`` with its EMA update does the averaging; this module only turns the bundle's
``ema_decay`` into one (or into nothing at 0) and refuses a decay outside ``[0, 1)`` by the option's name.
"""

from __future__ import annotations

from typing import Optional

from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

__all__ = ["weight_ema"]


def weight_ema(network: nn.Module, decay: float) -> Optional[AveragedModel]:
    """An EMA copy of ``network`` (parameters and buffers, so batch-norm statistics are averaged too), or None.

    After each optimizer step ``DiffCLTrainer`` calls ``update_parameters(cs)``: ``w_ema <- decay w_ema + (1 - decay)
    w`` (the first call copies ``w``). Polyak averaging of SGD's noisy last iterates; the mean teacher of UA-MT / BCP
    with ``ema_pseudo_labels``.

    Args:
        network: the CS network (not a DDP wrapper); it is deep-copied.
        decay: ``ema_decay``; 0: no average (None), else in (0, 1) (0.99 averages about the last 100 steps).

    Raises:
        ValueError: ``decay`` outside ``[0, 1)``.
    """
    decay = float(decay)
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1) (0: no average of the CS weights), got {decay}.")
    if decay == 0.0:
        return None
    return AveragedModel(network, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
