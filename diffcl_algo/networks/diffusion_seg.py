"""Diffusion segmentation network (DS, paper section 4.1): a timestep-conditioned V-Net on ``[image, Y_t]``."""

from __future__ import annotations

import torch
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding
from torch import nn

from diffcl_algo.networks.vnet import VNet

__all__ = ["DiffusionSegNet"]


class DiffusionSegNet(nn.Module):
    """DS network ``F~``: predicts the clean segmentation from the image and a noised one-hot label.

    Input is ``concat(x, Y_t)`` along channels, where ``Y_t = sqrt(abar_t) Y_0 + sqrt(1 - abar_t) eps`` (paper
    eq. 5). The net predicts ``Y_0`` directly (x0-prediction, eq. 3): its softmax is ``P~``. Conditioning on ``t``
    (the paper is silent; DDPM / ADM habit): sinusoidal embedding of ``t`` (``time_embed_dim``, MONAI's
    ``get_timestep_embedding``, Ho et al.) -> MLP ``Linear(time_embed_dim, 4 time_embed_dim), SiLU,
    Linear(4 time_embed_dim, 4 time_embed_dim)`` -> per-encoder-stage FiLM of the trunk
    ``VNet(in_channels + out_channels, out_channels, cond_dim=4 * time_embed_dim)``.

    Parameter count (``in_channels=1, out_channels=2, n_filters=16, norm="batch", time_embed_dim=128``):
    10,287,330 = V-Net trunk with 3 input channels 9,449,730 (the field's count for ``n_channels=3``) + time MLP
    328,704 + FiLM projections 508,896.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        out_channels: classes (background included); also the channels of ``Y_t``.
        n_filters: V-Net width.
        norm: V-Net normalisation (``"batch"``, ``"instance"``, ``"group"``, ``"none"``).
        dropout: V-Net channel dropout (bottleneck and last decoder map).
        time_embed_dim: size of the sinusoidal timestep embedding (even).
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 2,
        n_filters: int = 16,
        norm: str = "batch",
        dropout: float = 0.0,
        time_embed_dim: int = 128,
    ) -> None:
        super().__init__()
        if time_embed_dim < 2 or time_embed_dim % 2:
            raise ValueError(f"time_embed_dim must be a positive even int, got {time_embed_dim}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.time_embed_dim = time_embed_dim
        cond_dim = 4 * time_embed_dim
        self.time_mlp = nn.Sequential(nn.Linear(time_embed_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))
        self.vnet = VNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels + out_channels,
            out_channels=out_channels,
            n_filters=n_filters,
            norm=norm,
            dropout=dropout,
            cond_dim=cond_dim,
        )
        self.feature_channels = self.vnet.feature_channels

    def forward(
        self,
        x: torch.Tensor,
        y_t: torch.Tensor,
        t: torch.Tensor,
        return_features: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Predict clean-segmentation logits (eq. 3, x0-prediction).

        Args:
            x: image (B, in_channels, *S), spatial sizes divisible by 16.
            y_t: noised one-hot label (B, out_channels, *S) (eq. 5).
            t: diffusion timesteps (B,), integers in 1..T (``GaussianDiffusion`` convention).
            return_features: also return the last decoder feature map.

        Returns:
            logits (B, out_channels, *S) [, features (B, n_filters, *S)].
        """
        if y_t.shape[0] != x.shape[0] or y_t.shape[1] != self.out_channels or y_t.shape[2:] != x.shape[2:]:
            raise ValueError(
                f"y_t must have shape (B, {self.out_channels}, *S) matching x {tuple(x.shape)}, got {tuple(y_t.shape)}"
            )
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape (B,) = ({x.shape[0]},), got {tuple(t.shape)}")
        cond = self.time_mlp(get_timestep_embedding(t, self.time_embed_dim).to(x.dtype))
        return self.vnet(torch.cat([x, y_t], dim=1), cond, return_features=return_features)
