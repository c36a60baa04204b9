"""Per-class FIFO memory bank of labeled DS features (paper section 4.3).

The bank stores projected DS features ``f~^l`` at labeled voxels that DS predicted correctly; every iteration
``p`` features per class are sampled from it as the contrastive anchors ``a^gamma`` (eq. 12-15). Its storage is
made of registered buffers so it is saved and restored with ``state_dict()`` (exact resume).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["ClassMemoryBank", "all_gather_variable"]


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
