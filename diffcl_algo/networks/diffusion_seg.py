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

    Self-conditioning (``self_condition=True``; Chen et al., "Analog Bits", ICLR 2023; not in the paper): the input
    also holds the net's previous estimate of the clean signal, ``concat(x, Y_t, Y0_hat)`` (``Y0_hat`` zeros when
    there is none), so the trunk takes ``in_channels + 2 out_channels`` channels. DDIM sampling
    (:meth:`~diffcl_algo.diffusion.GaussianDiffusion.ddim_sample`) feeds each step the previous step's estimate; the
    trainer feeds half the iterations a first no-gradient estimate.

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
        self_condition: take the previous clean-signal estimate as a further input (above).
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
        self_condition: bool = False,
    ) -> None:
        super().__init__()
        if time_embed_dim < 2 or time_embed_dim % 2:
            raise ValueError(f"time_embed_dim must be a positive even int, got {time_embed_dim}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.time_embed_dim = time_embed_dim
        self.self_condition = bool(self_condition)
        cond_dim = 4 * time_embed_dim
        self.time_mlp = nn.Sequential(nn.Linear(time_embed_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))
        self.vnet = VNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels + (2 if self.self_condition else 1) * out_channels,
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
        self_cond: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Predict clean-segmentation logits (eq. 3, x0-prediction).

        Args:
            x: image (B, in_channels, *S), spatial sizes divisible by 16.
            y_t: noised one-hot label (B, out_channels, *S) (eq. 5).
            t: diffusion timesteps (B,), integers in 1..T (``GaussianDiffusion`` convention).
            return_features: also return the last decoder feature map.
            self_cond: with ``self_condition``, the previous clean-signal estimate (B, out_channels, *S); None: zeros.

        Returns:
            logits (B, out_channels, *S) [, features (B, n_filters, *S)].
        """
        if y_t.shape[0] != x.shape[0] or y_t.shape[1] != self.out_channels or y_t.shape[2:] != x.shape[2:]:
            raise ValueError(
                f"y_t must have shape (B, {self.out_channels}, *S) matching x {tuple(x.shape)}, got {tuple(y_t.shape)}"
            )
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape (B,) = ({x.shape[0]},), got {tuple(t.shape)}")
        inputs = [x, y_t]
        if self.self_condition:
            inputs.append(torch.zeros_like(y_t) if self_cond is None else self_cond.to(y_t.dtype))
            if inputs[-1].shape != y_t.shape:
                raise ValueError(f"self_cond must have y_t's shape {tuple(y_t.shape)}, got {tuple(inputs[-1].shape)}")
        elif self_cond is not None:
            raise ValueError("self_cond was given to a DiffusionSegNet built with self_condition=False.")
        cond = self.time_mlp(get_timestep_embedding(t, self.time_embed_dim).to(x.dtype))
        return self.vnet(torch.cat(inputs, dim=1), cond, return_features=return_features)
