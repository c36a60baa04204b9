"""Networks of Diff-CL: the CS V-Net (optionally with HF-Mamba), the DS diffusion V-Net, projection heads."""

from __future__ import annotations

from .diffusion_seg import DiffusionSegNet
from .heads import ProjectionHead
from .hf_mamba import HFMamba
from .ssm import MAMBA_SSM_AVAILABLE, Mamba, selective_scan
from .vnet import VNet

__all__ = ["DiffusionSegNet", "HFMamba", "MAMBA_SSM_AVAILABLE", "Mamba", "ProjectionHead", "VNet", "selective_scan"]
