"""Tests of diffcl_algo.losses: Dice+CE pairs (eq. 6-9, 18-21) and the contrastive loss (eq. 11-15)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from diffcl_algo.contrastive import ContrastiveLabelPropagationLoss
from diffcl_algo.losses import DiceCELoss


def _soft_dice(probs: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    dims = [0] + list(range(2, probs.ndim))  # batch=True: sums over the batch and voxels, per class
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    return (1 - (2 * inter + 1e-5) / (denom + 1e-5)).mean()


def test_dice_ce_matches_equations():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, 4)
    target = torch.randint(0, 3, (2, 1, 4, 4, 4))
    onehot = F.one_hot(target[:, 0], 3).movedim(-1, 1).float()
    probs = logits.softmax(1)
    dice = _soft_dice(probs, onehot)  # eq. 8 / 20, averaged over classes
    ce = -(onehot * probs.log()).sum(1).mean()  # eq. 9 / 21, averaged over voxels
    loss = DiceCELoss()
    assert loss(logits, target, 0.3).item() == pytest.approx((dice + 0.3 * ce).item(), rel=1e-5)
    assert loss(logits, target[:, 0], 0.0).item() == pytest.approx(dice.item(), rel=1e-5)  # (B, *S) target too


def test_dice_ce_weight_changes_per_call_and_has_grad():
    logits = torch.randn(1, 2, 4, 4, 4, requires_grad=True)
    target = torch.randint(0, 2, (1, 1, 4, 4, 4))
    loss = DiceCELoss()
    a, b = loss(logits, target, 0.01), loss(logits, target, 2.0)
    assert a.item() != b.item()
    b.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def _reference_cl(anchors, b, tau, k):
    """Direct transcription of eq. 11-15 with Python loops (mean over terms)."""
    terms = []
    for a in anchors:
        if a is None:
            continue
        cos = [[float(F.cosine_similarity(bj, ai, dim=0)) for ai in a] for bj in b]  # eq. 11
        score = [sum(row) for row in cos]
        pos = sorted(range(len(b)), key=lambda j: -score[j])[:k]  # eq. 12
        neg = sorted(range(len(b)), key=lambda j: -sum(1 - c for c in cos[j]))[:k]  # eq. 13
        for i in range(len(a)):
            for j in pos:  # eq. 14 for each positive
                num = math.exp(cos[j][i] / tau)
                den = num + sum(math.exp(cos[n][i] / tau) for n in neg)
                terms.append(-math.log(num / den))
    return sum(terms) / len(terms)  # eq. 15, averaged


def test_contrastive_hand_computed():
    # one class, anchor (1, 0); b = (1,0), (0,1), (-1,0), (0.6,0.8); k = 1, tau = 1
    # positive = (1,0) (cos 1), negative = (-1,0) (1 - cos = 2): L = -log(e / (e + e^-1)) = log(1 + e^-2)
    loss = ContrastiveLabelPropagationLoss(tau=1.0, top_k=1)
    anchors = [torch.tensor([[1.0, 0.0]])]
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.6, 0.8]])
    pos, neg = loss.select(anchors[0], b)
    assert pos.tolist() == [0] and neg.tolist() == [2]
    assert loss(anchors, b).item() == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-6)
    # scale invariance of the cosine: unnormalised inputs give the same value
    assert loss([anchors[0] * 3], b * 2).item() == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-6)


def test_contrastive_topk_sets_and_reference():
    torch.manual_seed(1)
    a0, a1 = torch.randn(5, 8), torch.randn(5, 8)
    b = torch.randn(40, 8)
    loss = ContrastiveLabelPropagationLoss(tau=0.1, top_k=6)
    score = (F.normalize(b, dim=1) @ F.normalize(a0, dim=1).T).sum(1)
    pos, neg = loss.select(a0, b)
    order = torch.argsort(score, descending=True)
    assert set(pos.tolist()) == set(order[:6].tolist())  # largest sum of cos
    assert set(neg.tolist()) == set(order[-6:].tolist())  # largest sum of (1 - cos)
    value = loss([a0, None, a1], b)
    assert value.item() == pytest.approx(_reference_cl([a0, None, a1], b, 0.1, 6), rel=1e-4)


def test_contrastive_gradient_and_skips():
    b = torch.randn(30, 4, requires_grad=True)
    loss = ContrastiveLabelPropagationLoss(tau=0.1, top_k=256)  # k > q: k = q
    out = loss([torch.randn(3, 4), None], b)
    assert torch.isfinite(out)
    out.backward()
    assert b.grad is not None and b.grad.abs().sum() > 0
    b.grad = None
    none = loss([None, None], b)  # every class skipped: 0, still connected to b
    assert none.item() == 0.0 and none.requires_grad
    none.backward()
    assert torch.equal(b.grad, torch.zeros_like(b))


def test_contrastive_invalid_args():
    with pytest.raises(ValueError):
        ContrastiveLabelPropagationLoss(tau=0.0)
