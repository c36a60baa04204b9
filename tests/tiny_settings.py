"""Training arguments small enough for CPU tests (16^3 patches, 4 filters, batch 1 + 1), shared by the tests."""

from __future__ import annotations

TINY_TRAIN = dict(
    num_labeled=2,
    patch_size=(16, 16, 16),
    strides=(8, 8, 8),
    n_filters=4,
    device="cpu",
    progress=False,
    use_hfm=False,  # HF-Mamba at stage 5 needs patches of at least 32 along some axis
    cl_num_anchors=8,
    cl_num_unlabeled=128,
    cl_top_k=16,
    bank_samples_per_class=32,
    head_dim=8,
    labeled_batch_size=1,
    unlabeled_batch_size=1,
    max_iterations=2,
    val_interval=0,
    ckpt_interval=1,
)
