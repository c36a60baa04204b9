"""Label propagation by contrastive learning (paper section 4.3, eq. 11-15): memory bank, projections, loss.

:class:`ContrastiveLabelPropagation` is the whole term as one module handed to the trainer: each iteration it
enqueues the projected DS features of labeled voxels that the DS predicted correctly into a per-class FIFO
:class:`ClassMemoryBank`, samples ``p`` anchors per class from it, projects ``q`` random unlabeled CS features and
returns ``L_cl`` (:class:`ContrastiveLabelPropagationLoss`). The bank's storage is registered buffers, so it is saved
and restored with ``state_dict()`` (exact resume). The bank is detached, so ``L_cl`` trains the CS head only; the DS
head that embeds the bank stays as initialised (docs/results.md, "What was tried": a shared head measured no gain).
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from diffcl_algo.losses import class_argmax

__all__ = [
    "ClassMemoryBank",
    "ContrastiveLabelPropagation",
    "ContrastiveLabelPropagationLoss",
    "all_gather_variable",
]


class ClassMemoryBank(nn.Module):
    """FIFO queue of ``capacity`` feature vectors per class.

    Buffers (all in ``state_dict``):
        ``features``: (C, capacity, dim) float; ``ptr``: (C,) long, next write slot; ``count``: (C,) long,
        number of valid slots (``<= capacity``).

    Args:
        num_classes: number of classes ``C`` (background included).
        dim: feature dimension ``d``.
        capacity: slots per class (default 2048).
    """

    features: torch.Tensor
    ptr: torch.Tensor
    count: torch.Tensor

    def __init__(self, num_classes: int, dim: int, capacity: int = 2048) -> None:
        super().__init__()
        if num_classes < 1 or dim < 1 or capacity < 1:
            raise ValueError(f"num_classes, dim and capacity must be >= 1, got {num_classes}, {dim}, {capacity}.")
        self.num_classes = int(num_classes)
        self.dim = int(dim)
        self.capacity = int(capacity)
        self.register_buffer("features", torch.zeros(num_classes, capacity, dim))
        self.register_buffer("ptr", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("count", torch.zeros(num_classes, dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Append features to their class queues, overwriting the oldest entries when full.

        Args:
            features: (N, dim) feature vectors (detached here).
            labels: (N,) integer class of each vector, in ``[0, C)``.
        """
        features = features.detach().to(self.features)
        labels = labels.reshape(-1).long().to(self.features.device)
        for c in range(self.num_classes):
            feats = features[labels == c]
            n = feats.shape[0]
            if n == 0:
                continue
            if n > self.capacity:  # only the newest `capacity` survive
                feats, n = feats[-self.capacity :], self.capacity
            ptr = int(self.ptr[c])
            slots = (torch.arange(n, device=self.features.device) + ptr) % self.capacity
            self.features[c, slots] = feats
            self.ptr[c] = (ptr + n) % self.capacity
            self.count[c] = min(int(self.count[c]) + n, self.capacity)

    @torch.no_grad()
    def sample(
        self, p: int, generator: Optional[torch.Generator] = None, min_count: int = 1
    ) -> list[Optional[torch.Tensor]]:
        """Draw ``p`` stored features per class.

        Without replacement when the class holds at least ``p`` features, with replacement otherwise.

        Args:
            p: features per class.
            generator: torch generator on the bank's device (deterministic draws).
            min_count: classes holding fewer than ``min_count`` features give None.

        Returns:
            length-C list of (p, dim) tensors or None (class empty / below ``min_count``).
        """
        device = self.features.device
        out: list[Optional[torch.Tensor]] = []
        for c in range(self.num_classes):
            n = int(self.count[c])
            if n == 0 or n < min_count:
                out.append(None)
                continue
            if n >= p:
                idx = torch.randperm(n, generator=generator, device=device)[:p]
            else:
                idx = torch.randint(n, (p,), generator=generator, device=device)
            out.append(self.features[c, idx].clone())
        return out

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, dim={self.dim}, capacity={self.capacity}"


def all_gather_variable(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate, in rank order, a tensor whose first dimension differs between ranks.

    Identity when ``torch.distributed`` is not initialised; otherwise every rank returns the same result,
    so queues fed with it stay identical across ranks.

    Args:
        tensor: (N_rank, *rest) tensor on this rank's device (``rest`` equal on all ranks).

    Returns:
        (sum_r N_r, *rest) tensor.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    world = dist.get_world_size()
    size = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    max_n = int(max(int(s) for s in sizes))
    padded = tensor.new_zeros((max_n, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded.contiguous())
    return torch.cat([g[: int(s)] for g, s in zip(gathered, sizes)], dim=0)


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

    Eq. 12-13 choose positives by similarity alone, so a class's positives need not belong to it: in trained LA
    runs the foreground's positives were 1-6% foreground (docs/results.md, Table 6).

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
            ``(pos_idx, neg_idx)``, each (k,) long indices into ``features``, ``k = min(top_k, q)``.
        """
        with torch.no_grad():
            cos = F.normalize(features.float(), dim=1) @ F.normalize(anchors.float(), dim=1).T  # (q, p), eq. 11
            score = cos.sum(dim=1)  # sum_i cos(b_j, a_i)
            far = anchors.shape[0] - score  # sum_i (1 - cos)
            k = min(self.top_k, features.shape[0])
            pos_idx = torch.topk(score, k).indices  # eq. 12
            neg_idx = torch.topk(far, k).indices  # eq. 13
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


class ContrastiveLabelPropagation(nn.Module):
    """``L_cl`` of one iteration (eq. 11-15) with the memory-bank update that precedes it (Algorithm 1, line 12).

    1. DS-head projections of labeled voxels that the DS predicted correctly, at most ``samples_per_class`` random
       voxels per class (gathered across DDP ranks), are enqueued (no gradient).
    2. ``num_anchors`` anchors per class are sampled from the bank (classes holding fewer than ``min_bank`` are
       skipped), and ``num_unlabeled`` random unlabeled CS-head projections ``b``.
    3. ``L_cl`` of the anchors and ``b`` (:class:`ContrastiveLabelPropagationLoss`).

    Both voxel-wise heads run on the chosen voxels only (their batch-norm statistics come from them), not on whole
    feature maps.

    Args:
        cs_head: CS projection head (``ProjectionHead``: 1x1 convolutions), trained through ``L_cl``.
        ds_head: DS projection head; its projections only fill the bank (no gradient).
        memory_bank: the per-class queue of DS projections.
        tau, top_k: temperature and ``k`` of eq. 12-14.
        num_anchors: ``p``, anchors per class sampled from the bank.
        num_unlabeled: ``q``, unlabeled CS features sampled per iteration.
        samples_per_class: correctly predicted labeled voxels enqueued per class per iteration and rank.
        min_bank: classes with fewer bank entries are skipped (default ``num_anchors``).
    """

    def __init__(
        self,
        cs_head: nn.Module,
        ds_head: nn.Module,
        memory_bank: ClassMemoryBank,
        tau: float = 0.1,
        top_k: int = 256,
        num_anchors: int = 64,
        num_unlabeled: int = 4096,
        samples_per_class: int = 256,
        min_bank: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.cs_head, self.ds_head, self.memory_bank = cs_head, ds_head, memory_bank
        self.loss = ContrastiveLabelPropagationLoss(tau=tau, top_k=top_k)
        self.num_anchors, self.num_unlabeled = int(num_anchors), int(num_unlabeled)
        self.samples_per_class = int(samples_per_class)
        self.min_bank = int(num_anchors if min_bank is None else min_bank)

    def forward(
        self,
        ds_logits_l: torch.Tensor,
        ds_feat_l: torch.Tensor,
        y: torch.Tensor,
        cs_feat_u: torch.Tensor,
        generator: torch.Generator,
        autocast: Callable[[], ContextManager] = contextlib.nullcontext,
    ) -> torch.Tensor:
        """Update the bank and return ``L_cl`` (0-d).

        Args:
            ds_logits_l: (b_l, C, *S) DS logits of the labeled images.
            ds_feat_l: (b_l, F, *S) DS decoder features of the labeled images.
            y: (b_l, 1, *S) labels.
            cs_feat_u: (b_u, F, *S) CS decoder features of the unlabeled images.
            generator: the iteration's generator (every draw is a function of seed and iteration).
            autocast: context in which the heads run (the trainer's mixed precision).
        """
        with torch.no_grad():  # the bank is detached: the DS head gets no gradient
            labels = y.reshape(-1)
            correct = class_argmax(ds_logits_l).reshape(-1) == labels
            chosen = []
            for c in range(self.memory_bank.num_classes):
                idx = torch.nonzero(correct & (labels == c)).flatten()
                if idx.numel() > self.samples_per_class:
                    idx = idx[torch.randperm(idx.numel(), generator=generator, device=idx.device)]
                    idx = idx[: self.samples_per_class]
                chosen.append(idx)
            idx = torch.cat(chosen)
            feats = _project_voxels(self.ds_head, ds_feat_l, idx, autocast)
            self.memory_bank.enqueue(all_gather_variable(feats), all_gather_variable(labels[idx]))
            anchors = self.memory_bank.sample(self.num_anchors, generator=generator, min_count=self.min_bank)
        voxels = cs_feat_u.shape[0] * cs_feat_u[0, 0].numel()
        pick = torch.randperm(voxels, generator=generator, device=cs_feat_u.device)[: self.num_unlabeled]
        return self.loss(anchors, _project_voxels(self.cs_head, cs_feat_u, pick, autocast))


def _project_voxels(
    head: nn.Module, features: torch.Tensor, index: torch.Tensor, autocast: Callable[[], ContextManager]
) -> torch.Tensor:
    """Projections of the voxels ``index`` (flat over batch and space) of ``features`` (B, F, *S): (n, d).

    The head is voxel-wise (1x1 convolutions), so it runs on the gathered voxels arranged as a (1, F, n, 1, 1)
    volume: the same features, its batch-norm statistics estimated from those n voxels.
    """
    per_case = features[0, 0].numel()
    picked = features.reshape(features.shape[0], features.shape[1], -1)[index // per_case, :, index % per_case]
    with autocast():
        out = head(picked.T.reshape((1, features.shape[1], -1) + (1,) * (features.ndim - 3)))
    return out.float().reshape(out.shape[1], -1).T
