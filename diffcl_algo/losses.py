"""Diff-CL losses.

* ``DiceCELoss``: ``D(P, y) + w E(P, y)``: soft Dice (eq. 8, 20) from ``monai.losses.DiceLoss`` plus
  cross-entropy (eq. 9, 21) from ``torch.nn.functional.cross_entropy``, the CE weight ``w`` given at call time
  because ``beta1``/``beta2`` follow the Gaussian ramp and change every iteration. Used for the supervised
  losses ``L_s^d``/``L_s^c`` (eq. 18-19, ``w = beta1``/``beta2``) and the cross pseudo-supervision losses
  ``L_p^d``/``L_p^c`` (eq. 6-7, ``w = lambda1``/``lambda2``).
* ``ContrastiveLabelPropagationLoss``: label propagation by contrastive learning (eq. 11-15).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss, MaskedDiceLoss
from monai.networks.utils import one_hot
from torch import nn

__all__ = ["DiceCELoss", "ContrastiveLabelPropagationLoss"]


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
        # the target is one-hot encoded before masking, so masked voxels count in no class
        self.masked_dice = MaskedDiceLoss(to_onehot_y=False, **options)

    def forward(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        ce_weight: float,
        dice_weight: float = 1.0,
        mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Compute the pair.

        Args:
            logits: (B, C, *S) raw network output (softmax is applied here).
            target: (B, 1, *S) or (B, *S) integer class map (ground truth or a detached argmax pseudo-label).
            ce_weight: weight of the cross-entropy term (``beta`` or ``lambda``).
            dice_weight: weight of the Dice term.
            mask: optional (B, 1, *S) 0/1 map of the voxels that count (e.g. confident pseudo-labels); both terms
                then use only those voxels (``monai.losses.MaskedDiceLoss``, CE averaged over the mask).

        Returns:
            0-d tensor ``dice_weight * D + ce_weight * E``; both terms averaged over voxels/classes.
        """
        if target.ndim == logits.ndim - 1:
            target = target.unsqueeze(1)
        target = target.long()
        logits = logits.float()
        if mask is None:
            dice = self.dice(logits, target) * dice_weight
            ce = F.cross_entropy(logits, target[:, 0]) if ce_weight else 0.0
        else:
            mask = mask.float()
            dice = self.masked_dice(logits, one_hot(target, logits.shape[1]), mask) * dice_weight
            ce_map = F.cross_entropy(logits, target[:, 0], reduction="none") if ce_weight else None
            ce = 0.0 if ce_map is None else (ce_map * mask[:, 0]).sum() / mask.sum().clamp_min(1.0)
        return dice if not ce_weight else dice + ce_weight * ce


class ContrastiveLabelPropagationLoss(nn.Module):
    """Label propagation by contrastive learning, eq. 11-15.

    For every class ``gamma`` with anchors ``a^gamma`` (p labeled DS features sampled from the memory bank) and
    the q unlabeled CS features ``b``:

    * eq. 11: ``cos(b_j, a_i)`` cosine similarity (both sides L2-normalised here);
    * eq. 12: positives ``b^{gamma,P}`` = the ``k`` features of ``b`` with the largest ``sum_i cos(b_j, a_i)``;
    * eq. 13: negatives ``b^{gamma,N}`` = the ``k`` features with the largest ``sum_i (1 - cos(b_j, a_i))``;
    * eq. 14: ``L(a_i, b_j) = -log(e^{c_ij/tau} / (e^{c_ij/tau} + sum_{b_n in N} e^{cos(a_i, b_n)/tau}))``,
      evaluated for every anchor ``a_i`` and every positive ``b_j``;
    * eq. 15 sums eq. 14 over classes, anchors and positives. This implementation returns the **average** over
      all those terms (sum / number of terms) so the loss scale does not depend on ``p``, ``k`` or on how many
      classes took part; multiply by ``C * p * k`` to recover the sum.

    ``k`` is ``min(top_k, q)`` (positives and negatives may overlap when ``q < 2k``). A class whose anchors are
    ``None`` (empty or too small memory bank) is skipped. When every class is skipped the loss is
    ``0 * b.sum()``: zero, but still connected to ``b`` so backward (and DDP) see every parameter.
    The selection of positives/negatives (top-k) is not differentiated; gradients flow through the
    similarities of the selected pairs, into ``b`` (and into ``a`` when it requires grad).

    Args:
        tau: temperature of eq. 14 (default 0.1).
        top_k: ``k`` of eq. 12-13 (default 256).
    """

    def __init__(self, tau: float = 0.1, top_k: int = 256) -> None:
        super().__init__()
        if tau <= 0 or top_k < 1:
            raise ValueError(f"tau must be > 0 and top_k >= 1, got tau={tau}, top_k={top_k}.")
        self.tau = float(tau)
        self.top_k = int(top_k)

    def select(self, anchors: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices of the positives (eq. 12) and negatives (eq. 13) of one class.

        Args:
            anchors: (p, d) class anchors ``a^gamma``.
            features: (q, d) unlabeled features ``b``.

        Returns:
            ``(pos_idx, neg_idx)``, each (k,) long indices into ``features``.
        """
        with torch.no_grad():
            cos = F.normalize(features.float(), dim=1) @ F.normalize(anchors.float(), dim=1).T  # (q, p), eq. 11
            score = cos.sum(dim=1)  # sum_i cos(b_j, a_i)
            k = min(self.top_k, features.shape[0])
            pos_idx = torch.topk(score, k).indices  # eq. 12
            neg_idx = torch.topk(anchors.shape[0] - score, k).indices  # eq. 13: sum_i (1 - cos)
        return pos_idx, neg_idx

    def forward(self, anchors: Sequence[Optional[torch.Tensor]], features: torch.Tensor) -> torch.Tensor:
        """Compute ``L_cl``.

        Args:
            anchors: length-C sequence; entry ``gamma`` is (p, d) anchors of class ``gamma`` or None (skipped).
            features: (q, d) unlabeled CS projected features ``b``.

        Returns:
            0-d tensor, the mean of eq. 14 over classes, anchors and positives.
        """
        b = F.normalize(features.float(), dim=1)
        total = features.new_zeros((), dtype=torch.float32)
        count = 0
        for a in anchors:
            if a is None or a.shape[0] == 0 or features.shape[0] == 0:
                continue
            pos_idx, neg_idx = self.select(a, features)
            a_n = F.normalize(a.float(), dim=1)
            pos = a_n @ b[pos_idx].T / self.tau  # (p, k): cos(a_i, b_j) / tau, b_j positive
            neg = a_n @ b[neg_idx].T / self.tau  # (p, k): cos(a_i, b_n) / tau, b_n negative
            neg_lse = torch.logsumexp(neg, dim=1, keepdim=True)  # log sum_n e^{cos(a_i, b_n)/tau}
            terms = torch.logaddexp(pos, neg_lse) - pos  # eq. 14, numerically stable
            total = total + terms.sum()
            count += terms.numel()
        if count == 0:
            return features.sum() * 0.0
        return total / count
