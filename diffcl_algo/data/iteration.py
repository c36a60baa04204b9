"""Deterministic, exactly resumable data flow of Diff-CL training: one dataset item per training iteration.

* ``IterationBatchDataset`` + ``IterationSampler``: item ``i`` of the dataset is the *whole* (per-rank) batch of
  global iteration ``i``; the sampler yields ``range(start_iteration, max_iterations)``. Case indices come from
  per-pass permutations seeded by ``(seed, stream, pass)`` and each sample's augmentation is re-seeded from
  ``(seed, iteration, slot)``, so any batch is a pure function of ``(seed, iteration)``.
* seeds come from :func:`diffcl_algo.utils.derive_seed` with the streams of :class:`~diffcl_algo.utils.SeedStream`
  (the trainer's timesteps, noise and sampling draw from them too), so resuming needs only the iteration counter.

MONAI and PyTorch have no sampler that restarts a run mid-epoch at a given iteration with the same batches, so
this is written here.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Randomizable
from torch.utils.data import DataLoader, Dataset, Sampler

from diffcl_algo.data.transforms import HIDDEN_LABEL
from diffcl_algo.utils import SeedStream, derive_seed, rank_world

__all__ = ["IterationBatchDataset", "IterationSampler", "make_iteration_loader"]


class IterationBatchDataset(Dataset):
    """Item ``i`` = this rank's batch of global iteration ``i`` (labeled + unlabeled), deterministic in ``seed``.

    Case order: the labeled (unlabeled) cases form an endless stream, the concatenation of per-pass random
    permutations, pass ``k`` permuted by ``derive_seed(seed, stream, k)``. Global iteration ``i`` consumes stream
    positions ``[i * b * W, (i + 1) * b * W)`` (``b`` = per-rank batch size, ``W`` = world size) and rank ``r``
    takes the slice ``[r * b, (r + 1) * b)`` of them. Every pass visits every case once; batches are always full.

    Augmentation: before transforming sample ``slot`` (global position in the iteration's batch) the
    transform's random state is reset with ``set_random_state(derive_seed(seed, SeedStream.AUGMENT, i, slot))`` (MONAI
    ``Randomizable``; ``Compose`` propagates it), so a sample's augmentation does not depend on the worker,
    on the order of ``__getitem__`` calls, or on previous iterations.

    Args:
        labeled: datalist of labeled cases (``{"image": ..., "label": ...}``).
        unlabeled: datalist of unlabeled cases (``{"image": ...}``).
        labeled_transform: transform of a labeled item -> ``{"image": (C, *patch), "label": (1, *patch)}``.
        unlabeled_transform: transform of an unlabeled item -> ``{"image": (C, *patch)}``; default
            ``labeled_transform``.
        labeled_batch_size: labeled cases per iteration per rank (paper: 2).
        unlabeled_batch_size: unlabeled cases per iteration per rank (paper: 2).
        seed: base seed.
        max_iterations: ``len()`` of the dataset (the sampler decides what is read).
        rank, world_size: data-parallel position; default from ``torch.distributed`` (0 / 1 when not initialised).

    Returns (item):
        ``{"image": (b_l + b_u, C, *patch) float, "label": (b_l, 1, *patch) float, "iteration": i}``, labeled
        images first; plus ``"hidden_label"`` (b_u, 1, *patch) when the unlabeled transform yields that key for
        every unlabeled sample (pseudo-label monitoring only; training never reads it).
    """

    def __init__(
        self,
        labeled: Sequence[Mapping[str, Any]],
        unlabeled: Sequence[Mapping[str, Any]],
        labeled_transform: Callable[[dict], Any],
        unlabeled_transform: Optional[Callable[[dict], Any]] = None,
        labeled_batch_size: int = 2,
        unlabeled_batch_size: int = 2,
        seed: int = 0,
        max_iterations: int = 1,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
    ) -> None:
        if not labeled or not unlabeled:
            raise ValueError(f"Need labeled and unlabeled cases, got {len(labeled)} and {len(unlabeled)}.")
        for name, size in (("labeled_batch_size", labeled_batch_size), ("unlabeled_batch_size", unlabeled_batch_size)):
            if int(size) < 1:
                raise ValueError(f"{name} must be >= 1, got {size}.")
        self.labeled = list(labeled)
        self.unlabeled = list(unlabeled)
        self.labeled_transform = labeled_transform
        self.unlabeled_transform = unlabeled_transform if unlabeled_transform is not None else labeled_transform
        self.labeled_batch_size = int(labeled_batch_size)
        self.unlabeled_batch_size = int(unlabeled_batch_size)
        self.seed = int(seed)
        self.max_iterations = int(max_iterations)
        default_rank, default_world = rank_world()
        self.rank = default_rank if rank is None else int(rank)
        self.world_size = default_world if world_size is None else int(world_size)
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def __len__(self) -> int:
        return self.max_iterations

    def _stream(self, stream: int, num_cases: int, batch: int, iteration: int) -> list[int]:
        start = (iteration * self.world_size + self.rank) * batch
        out = []
        for pos in range(start, start + batch):
            key = (stream, pos // num_cases)
            if key not in self._perms:
                if len(self._perms) > 64:
                    self._perms.clear()
                self._perms[key] = np.random.default_rng(derive_seed(self.seed, stream, key[1])).permutation(num_cases)
            out.append(int(self._perms[key][pos % num_cases]))
        return out

    def case_indices(self, iteration: int) -> tuple[list[int], list[int]]:
        """``(labeled, unlabeled)`` case indices of this rank's batch at global ``iteration``."""
        lab = self._stream(SeedStream.LABELED, len(self.labeled), self.labeled_batch_size, iteration)
        unl = self._stream(SeedStream.UNLABELED, len(self.unlabeled), self.unlabeled_batch_size, iteration)
        return lab, unl

    def _apply(self, transform: Callable[[dict], Any], item: Mapping[str, Any], iteration: int, slot: int) -> dict:
        if isinstance(transform, Randomizable):
            transform.set_random_state(seed=derive_seed(self.seed, SeedStream.AUGMENT, iteration, slot))
        out = transform(dict(item))
        if isinstance(out, (list, tuple)):  # transforms producing several samples: keep the first
            out = out[0]
        return out

    def __getitem__(self, iteration: int) -> dict[str, Any]:
        iteration = int(iteration)
        lab, unl = self.case_indices(iteration)
        bl, bu = self.labeled_batch_size, self.unlabeled_batch_size
        images, labels = [], []
        for k, j in enumerate(lab):
            out = self._apply(self.labeled_transform, self.labeled[j], iteration, self.rank * bl + k)
            images.append(_plain(out["image"]))
            labels.append(_plain(out["label"]))
        offset = bl * self.world_size
        hidden = []
        for k, j in enumerate(unl):
            out = self._apply(self.unlabeled_transform, self.unlabeled[j], iteration, offset + self.rank * bu + k)
            images.append(_plain(out["image"]))
            if HIDDEN_LABEL in out:
                hidden.append(_plain(out[HIDDEN_LABEL]))
        batch = {"image": torch.stack(images).float(), "label": torch.stack(labels).float(), "iteration": iteration}
        if hidden and len(hidden) == len(unl):
            batch[HIDDEN_LABEL] = torch.stack(hidden).float()
        return batch


def _plain(x: Any) -> torch.Tensor:
    x = x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x)
    return x


class IterationSampler(Sampler[int]):
    """Yields global iteration numbers ``start .. stop - 1``; ``DiffCLTrainer.run`` sets ``start`` on resume."""

    def __init__(self, start: int = 0, stop: int = 1) -> None:
        self.start = int(start)
        self.stop = int(stop)

    def __iter__(self):
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)


def make_iteration_loader(
    dataset: IterationBatchDataset, num_workers: int = 0, pin_memory: bool = False, start_iteration: int = 0
) -> DataLoader:
    """``DataLoader(dataset, sampler=IterationSampler(start, dataset.max_iterations), batch_size=None)``.

    Args:
        dataset: the per-iteration batch dataset.
        num_workers: loader processes (each item is a whole batch, so workers prepare whole iterations).
        pin_memory: pin batches (CUDA).
        start_iteration: first iteration (``DiffCLTrainer.run`` moves it to the resumed iteration anyway).
    """
    return DataLoader(
        dataset,
        sampler=IterationSampler(start_iteration, dataset.max_iterations),
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
    )

