"""Training arguments small enough for CPU tests, shared by the tests.

``SMALL_TRAIN``: 32x32x16 patches (HF-Mamba fits), 4 filters, the default 2 + 2 batch.
``TINY_TRAIN``: 16^3 patches without HF-Mamba and without the mean teacher, batch 1 + 1, 2 iterations, no validation.
"""

from __future__ import annotations

import torch

from diffcl_algo.training.trainer import DiffCLTrainer

CL = "nets#contrastive_def#"  # the contrastive term's sizes (eq. 11-15)
HEAD = "nets#cs_head_def#out_channels"  # the projection heads' width

SMALL_TRAIN = dict(
    num_labeled=2,
    patch_size=(32, 32, 16),
    strides=(16, 16, 8),
    n_filters=4,
    device="cpu",
    progress=False,
    **{f"{CL}num_anchors": 16, f"{CL}num_unlabeled": 512, f"{CL}top_k": 32, f"{CL}samples_per_class": 64, HEAD: 16},
)

TINY_TRAIN = dict(
    SMALL_TRAIN,
    patch_size=(16, 16, 16),
    strides=(8, 8, 8),
    use_hfm=False,  # HF-Mamba at stage 5 needs patches of at least 32 along some axis
    ema_decay=0.0,  # the mean teacher's train-mode forward of one 16^3 patch has one voxel at the bottleneck
    **{f"{CL}num_anchors": 8, f"{CL}num_unlabeled": 128, f"{CL}top_k": 16, f"{CL}samples_per_class": 32, HEAD: 8},
    labeled_batch_size=1,
    unlabeled_batch_size=1,
    max_iterations=2,
    val_interval=0,
    ckpt_interval=1,
)


def handler_of(trainer, kind):
    """The trainer's handler of type ``kind`` (the bundle graph's ``train#handlers`` attach exactly one of each)."""
    found = [h for h in trainer.train_handlers if isinstance(h, kind)]
    assert len(found) == 1, f"{len(found)} handlers of type {kind.__name__}"
    return found[0]


class ForegroundPseudoLabelTrainer(DiffCLTrainer):
    """A variant (docs/training.md, "Writing a variant"): the CS pseudo-labels are all foreground."""

    def cs_pseudo_labels(self, x_u: torch.Tensor, cs_logits_u: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(cs_logits_u[:, :1], dtype=torch.long)
