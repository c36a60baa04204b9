"""Projection head mapping decoder features to unit-norm embeddings for contrastive label propagation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Act, Conv
from monai.networks.layers.utils import get_norm_layer
from torch import nn

__all__ = ["ProjectionHead"]


class ProjectionHead(nn.Module):
    """Voxel-wise projection head (paper Fig. 1, section 4.3): features ``f`` -> embeddings of dimension ``d``.

    ``conv 1x1 -> norm -> ReLU -> conv 1x1``, then L2 normalisation over channels, so the cosine similarity
    of eq. 11 is a plain dot product. One head per network (CS and DS), as in Fig. 1.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the decoder features (the V-Net's ``feature_channels``).
        out_channels: embedding dimension ``d``.
        hidden_channels: width of the hidden layer; ``None`` means ``in_channels``.
        norm: hidden-layer normalisation: ``"batch"`` (default), ``"instance"``, or ``"none"``.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 16,
        out_channels: int = 64,
        hidden_channels: int | None = None,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        if norm not in ("batch", "instance", "none"):
            raise ValueError(f"unknown norm {norm!r}, expected 'batch', 'instance' or 'none'")
        hidden = in_channels if hidden_channels is None else hidden_channels
        conv = Conv[Conv.CONV, spatial_dims]
        self.net = nn.Sequential(
            conv(in_channels, hidden, kernel_size=1),
            *([] if norm == "none" else [get_norm_layer(norm, spatial_dims, hidden)]),
            Act[Act.RELU](inplace=True),
            conv(hidden, out_channels, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project features.

        Args:
            x: (B, in_channels, *S).

        Returns:
            (B, out_channels, *S), unit L2 norm along dim 1.
        """
        return F.normalize(self.net(x), dim=1)
