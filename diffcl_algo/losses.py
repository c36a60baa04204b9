"""Diff-CL losses.

* ``DiceCELoss``: ``D(P, y) + w E(P, y)``: soft Dice (eq. 8, 20) from ``monai.losses.DiceLoss`` plus
  cross-entropy (eq. 9, 21) from ``torch.nn.functional.cross_entropy``, the CE weight ``w`` given at call time
  because ``beta1``/``beta2`` follow the Gaussian ramp and change every iteration. Used for the supervised
  losses ``L_s^d``/``L_s^c`` (eq. 18-19, ``w = beta1``/``beta2``) and the cross pseudo-supervision losses
  ``L_p^d``/``L_p^c`` (eq. 6-7, ``w = lambda1``/``lambda2``).
* ``class_argmax``: the pseudo-labels ``argmax P`` of the cross pseudo-supervision (eq. 6-7).

The contrastive label propagation loss (eq. 11-15) lives with its memory bank in :mod:`diffcl_algo.contrastive`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

__all__ = ["DiceCELoss", "class_argmax"]


class DiceCELoss(nn.Module):
    """``dice_weight * D(P, y) + ce_weight * E(P, y)`` with ``P = softmax(logits)`` (eq. 6-9, 18-21).

    The paper's form is ``D + beta E`` over all classes (``include_background=True``, ``dice_weight=1``). The field's
    supervised V-Net recipe (UA-MT / SSL4MIS ``train_LA``) is ``0.5 * (E + D_fg)``: the Dice of the foreground only,
    with squared terms in the denominator (``include_background=False, squared_pred=True``, weights 0.5 / 0.5).

    Args:
        include_background: whether the Dice term averages over the background class too (the paper's
            ``D`` is class-agnostic; default True, i.e. mean over all ``C`` classes).
        batch: compute the Dice intersection/union over the whole batch before dividing (the field's
            SSL4MIS ``DiceLoss`` convention) instead of per sample.
        squared_pred: ``sum(P^2) + sum(y^2)`` in the Dice denominator (the field's ``dice_loss``).
        smooth_nr, smooth_dr: Dice smoothing constants (``monai.losses.DiceLoss``).
    """

    def __init__(
        self,
        include_background: bool = True,
        batch: bool = True,
        squared_pred: bool = False,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
    ) -> None:
        super().__init__()
        options = dict(
            include_background=include_background,
            softmax=True,
            squared_pred=squared_pred,
            batch=batch,
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
        )
        self.dice = DiceLoss(to_onehot_y=True, **options)

    def forward(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        ce_weight: float,
        dice_weight: float = 1.0,
    ) -> torch.Tensor:
        """Compute the pair.

        Args:
            logits: (B, C, *S) raw network output (softmax is applied here).
            target: (B, 1, *S) or (B, *S) integer class map (ground truth or a detached argmax pseudo-label).
            ce_weight: weight of the cross-entropy term (``beta`` or ``lambda``).
            dice_weight: weight of the Dice term.

        Returns:
            0-d tensor ``dice_weight * D + ce_weight * E``; both terms averaged over voxels/classes.
        """
        if target.ndim == logits.ndim - 1:
            target = target.unsqueeze(1)
        target = target.long()
        logits = logits.float()
        dice = self.dice(logits, target) * dice_weight
        ce = F.cross_entropy(logits, target[:, 0]) if ce_weight else 0.0
        return dice if not ce_weight else dice + ce_weight * ce


def class_argmax(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(dim=1, keepdim=True)`` for few classes, by running comparisons over the class channels.

    Same result (the first maximal class wins ties); written by hand because on CPU a reduction over the short,
    strided channel axis of a (B, 2, *S) volume costs more than one V-Net convolution layer (measured in
    docs/performance.md).

    Args:
        logits: (B, C, *S) scores.

    Returns:
        (B, 1, *S) long class map.
    """
    best = logits[:, :1]
    index = torch.zeros_like(best, dtype=torch.long)
    for c in range(1, logits.shape[1]):
        better = logits[:, c : c + 1] > best
        index = torch.where(better, torch.full_like(index, c), index)
        best = torch.where(better, logits[:, c : c + 1], best)
    return index
