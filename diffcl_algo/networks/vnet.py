"""The field's V-Net (SSL4MIS / UA-MT ``networks/vnet.py``), residual, dimension-agnostic, with optional
HF-Mamba stages and FiLM conditioning.

This is the backbone of both Diff-CL networks (paper section 5.2: "we utilize V-Net as the backbone network of DS
and CS"): the CS network is ``VNet(hfm_stages=(5,))`` and the DS trunk is ``VNet(cond_dim=...)`` (see
:class:`diffcl_algo.networks.diffusion_seg.DiffusionSegNet`). It is the small V-Net of the semi-supervised
segmentation literature (~9.4M parameters at ``n_filters=16``), not MONAI's ``monai.networks.nets.VNet``
(Milletari's original, ~45M parameters).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Act, Conv, Dropout
from monai.networks.layers.utils import get_norm_layer
from torch import nn

from diffcl_algo.networks.hf_mamba import HFMamba

__all__ = ["DOWNSAMPLING_FACTOR", "VNet", "ConvBlock", "DownsamplingConvBlock", "UpsamplingDeconvBlock"]

NORMS = ("batch", "instance", "group", "none")
#: total downsampling of the V-Net (4 stride-2 stages): every input size (patch) must be a multiple of it
DOWNSAMPLING_FACTOR = 16
# the field's GroupNorm uses 16 groups; gcd(16, channels) keeps small n_filters valid and equals 16 when n_filters=16
GROUP_NORM_GROUPS = 16


def _shape_str(shape: List[int]) -> str:
    """``(a, b, c)``: a shape as Python prints a tuple (TorchScript-compatible)."""
    return "(" + ", ".join([str(s) for s in shape]) + ")"


def _norm(norm: str, spatial_dims: int, channels: int) -> list[nn.Module]:
    """Normalisation layer(s) for ``channels`` features: empty for ``"none"`` (the field's ``normalization``)."""
    if norm == "none":
        return []
    if norm == "group":
        return [
            get_norm_layer(("group", {"num_groups": math.gcd(GROUP_NORM_GROUPS, channels)}), spatial_dims, channels)
        ]
    return [get_norm_layer(norm, spatial_dims, channels)]


class ConvBlock(nn.Module):
    """``n_stages`` x (conv 3 + norm + ReLU), optionally residual (the field's ``ConvBlock`` / ``ResidualConvBlock``).

    Residual form (``ResidualConvBlock``): ``relu(convs(x) + x)``, where the last conv's ReLU is moved after the
    addition; it adds no parameters and needs ``in_channels == out_channels``.

    Args:
        spatial_dims: 2 or 3.
        n_stages: number of convolutions.
        in_channels: input channels.
        out_channels: output channels.
        norm: one of ``"batch"``, ``"instance"``, ``"group"``, ``"none"``.
        residual: add the identity shortcut.

    Shapes: (B, in_channels, *S) -> (B, out_channels, *S).
    """

    def __init__(
        self, spatial_dims: int, n_stages: int, in_channels: int, out_channels: int, norm: str, residual: bool
    ) -> None:
        super().__init__()
        if residual and in_channels != out_channels:
            raise ValueError(
                f"a residual ConvBlock needs in_channels == out_channels, got {in_channels}, {out_channels}"
            )
        conv_type = Conv[Conv.CONV, spatial_dims]
        ops: list[nn.Module] = []
        for i in range(n_stages):
            ops.append(conv_type(in_channels if i == 0 else out_channels, out_channels, kernel_size=3, padding=1))
            ops += _norm(norm, spatial_dims, out_channels)
            if not (residual and i == n_stages - 1):
                ops.append(Act[Act.RELU](inplace=True))
        self.conv = nn.Sequential(*ops)
        self.residual = residual
        self.relu = Act[Act.RELU](inplace=True)  # used when residual (no parameters; always present for TorchScript)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.residual:
            return self.relu(self.conv(x) + x)
        return self.conv(x)


class DownsamplingConvBlock(nn.Module):
    """Strided conv (kernel 2, stride 2) + norm + ReLU: (B, C_in, *S) -> (B, C_out, *S / 2)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, norm: str) -> None:
        super().__init__()
        conv = Conv[Conv.CONV, spatial_dims](in_channels, out_channels, kernel_size=2, stride=2, padding=0)
        self.conv = nn.Sequential(conv, *_norm(norm, spatial_dims, out_channels), Act[Act.RELU](inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class UpsamplingDeconvBlock(nn.Module):
    """Transposed conv (kernel 2, stride 2) + norm + ReLU: (B, C_in, *S) -> (B, C_out, *S * 2)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, norm: str) -> None:
        super().__init__()
        conv = Conv[Conv.CONVTRANS, spatial_dims](in_channels, out_channels, kernel_size=2, stride=2, padding=0)
        self.conv = nn.Sequential(conv, *_norm(norm, spatial_dims, out_channels), Act[Act.RELU](inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class VNet(nn.Module):
    """The field's V-Net (SSL4MIS / UA-MT ``VNet``) with residual stages, HF-Mamba stages and FiLM conditioning.

    Layout (``n`` = ``n_filters``), exactly the field's: encoder stages ``block_one`` .. ``block_five`` with
    1, 2, 3, 3, 3 convolutions at ``n, 2n, 4n, 8n, 16n`` channels, each followed (stages 1-4) by a strided-conv
    down block ``block_<k>_dw``; decoder up blocks ``block_<k>_up`` (transposed conv) whose outputs are *added*
    to the encoder skip, decoder stages ``block_six`` .. ``block_nine`` with 3, 3, 2, 1 convolutions; a 1x1
    ``out_conv``. Submodule names and ``state_dict`` keys are the field's, so a UA-MT / SSL4MIS checkpoint
    with the same ``norm`` loads with ``load_state_dict`` (use ``residual=False`` for the field's plain
    ``ConvBlock`` behaviour; the residual form has the same parameters).

    Differences from the field, all parameter-free unless enabled:

    - ``residual=True`` (default): every stage whose input and output widths agree (all but ``block_one``, whose
      input is the image) is a ``ResidualConvBlock``: ``relu(convs(x) + x)``.
    - ``dropout`` p (default 0.0, the field uses ``Dropout3d(0.5)`` when ``has_dropout``): channel dropout on the
      bottleneck map and on the last decoder map, as the field does.
    - ``hfm_stages``: an :class:`~diffcl_algo.networks.hf_mamba.HFMamba` (paper eq. 10) on the output of each
      listed encoder stage (1..5, 5 = deepest), before that output is used as skip and downsampled, merged as a
      residual ``f + F_o`` (the paper does not say how ``F_o`` rejoins the CS; used as a replacement, its
      high-pass discards the low frequencies of the bottleneck and CS learned far slower in our tests). Its gated
      spatial conv uses instance norm, so in training that stage needs more than one voxel (stage ``k`` has
      ``S / 2**(k-1)`` voxels per axis: 112x112x80 or 96^3 patches give 7x7x5 or 6^3 at stage 5).
    - ``cond_dim``: per-encoder-stage FiLM (``h * (1 + scale) + shift``, applied to the stage output before any
      HF-Mamba) with ``(scale, shift) = Linear(cond_dim, 2 * channels)(silu(cond))`` (the DDPM / ADM
      ``emb_layers`` form); used for the DS timestep conditioning.
    - ``spatial_dims`` 2 or 3 (the field is 3D only), via MONAI's layer factories.
    - group norm uses ``gcd(16, channels)`` groups (the field: 16).

    The network (HF-Mamba included) compiles with ``torch.jit.script`` (the bundles' ``ckpt_export``); the scripted
    module gives the eager output and keeps the input checks.

    Parameter counts (``in_channels=1, out_channels=2, n_filters=16``, no HF-Mamba, no FiLM; checked against a
    line-by-line replica of the field's ``VNet``, which gives the same numbers):
    ``norm="batch"`` or ``"group"``: 9,448,866; ``"instance"`` or ``"none"``: 9,443,266 (the field's
    ``InstanceNorm3d`` has no affine parameters). With ``hfm_stages=(5,)`` and ``norm="batch"``: 14,697,122
    (the 256-channel HF-Mamba with its default sizes adds 5,248,256; ``hfm_hf`` adds none).

    Args:
        spatial_dims: number of spatial dimensions, 2 or 3.
        in_channels: input channels.
        out_channels: output channels (classes, background included).
        n_filters: width of the first stage (the field: 16).
        norm: ``"batch"``, ``"instance"``, ``"group"`` or ``"none"``.
        dropout: channel-dropout probability at the bottleneck and the last decoder map, in [0, 1).
        hfm_stages: encoder stages (1..5) followed by an HF-Mamba module.
        hfm_hf: HF-Mamba high-frequency fraction (paper Table 2 "HF").
        cond_dim: size of the conditioning vector; ``None`` disables FiLM.
        residual: residual stages (``ResidualConvBlock``); ``False`` gives the field's plain ``ConvBlock`` net.

    Attributes:
        feature_channels: channels of the feature map returned with ``return_features`` (``n_filters``).
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 2,
        n_filters: int = 16,
        norm: str = "batch",
        dropout: float = 0.0,
        hfm_stages: Sequence[int] = (),
        hfm_hf: float = 0.7,
        cond_dim: int | None = None,
        residual: bool = True,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}, expected one of {NORMS}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.downsampling = DOWNSAMPLING_FACTOR  # an attribute, so that TorchScript reads it
        hfm_stages = tuple(hfm_stages)
        bad = [s for s in hfm_stages if s not in (1, 2, 3, 4, 5)]
        if bad or len(set(hfm_stages)) != len(hfm_stages):
            raise ValueError(f"hfm_stages must be distinct encoder stages in 1..5 (5 = deepest), got {hfm_stages}")
        if cond_dim is not None and cond_dim < 1:
            raise ValueError(f"cond_dim must be a positive int or None, got {cond_dim}")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.feature_channels = n_filters
        self.cond_dim = cond_dim
        n, d = n_filters, spatial_dims

        self.block_one = ConvBlock(d, 1, in_channels, n, norm, residual=False)
        self.block_one_dw = DownsamplingConvBlock(d, n, 2 * n, norm)
        self.block_two = ConvBlock(d, 2, 2 * n, 2 * n, norm, residual)
        self.block_two_dw = DownsamplingConvBlock(d, 2 * n, 4 * n, norm)
        self.block_three = ConvBlock(d, 3, 4 * n, 4 * n, norm, residual)
        self.block_three_dw = DownsamplingConvBlock(d, 4 * n, 8 * n, norm)
        self.block_four = ConvBlock(d, 3, 8 * n, 8 * n, norm, residual)
        self.block_four_dw = DownsamplingConvBlock(d, 8 * n, 16 * n, norm)
        self.block_five = ConvBlock(d, 3, 16 * n, 16 * n, norm, residual)
        self.block_five_up = UpsamplingDeconvBlock(d, 16 * n, 8 * n, norm)
        self.block_six = ConvBlock(d, 3, 8 * n, 8 * n, norm, residual)
        self.block_six_up = UpsamplingDeconvBlock(d, 8 * n, 4 * n, norm)
        self.block_seven = ConvBlock(d, 3, 4 * n, 4 * n, norm, residual)
        self.block_seven_up = UpsamplingDeconvBlock(d, 4 * n, 2 * n, norm)
        self.block_eight = ConvBlock(d, 2, 2 * n, 2 * n, norm, residual)
        self.block_eight_up = UpsamplingDeconvBlock(d, 2 * n, n, norm)
        self.block_nine = ConvBlock(d, 1, n, n, norm, residual)
        self.out_conv = Conv[Conv.CONV, d](n, out_channels, kernel_size=1, padding=0)
        self.dropout = Dropout[Dropout.DROPOUT, d](p=dropout) if dropout > 0 else nn.Identity()

        stage_channels = (n, 2 * n, 4 * n, 8 * n, 16 * n)
        self.hfm = nn.ModuleDict(
            {
                str(s): HFMamba(spatial_dims=d, channels=stage_channels[s - 1], hf=hfm_hf)
                for s in sorted(hfm_stages)
            }
        )
        self.film = nn.ModuleList(nn.Linear(cond_dim, 2 * c) for c in stage_channels) if cond_dim is not None else None

    def _check_input(self, x: torch.Tensor, cond: Optional[torch.Tensor]) -> None:
        if x.dim() != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"VNet expects input (B, {self.in_channels}, *S) with {self.spatial_dims} spatial dims, "
                f"got shape {_shape_str(list(x.shape))}"
            )
        spatial = list(x.shape[2:])
        for s in spatial:
            if s % self.downsampling != 0:
                raise ValueError(
                    "VNet needs every spatial size divisible by 16 (4 stride-2 downsamplings), "
                    f"got {_shape_str(spatial)}"
                )
        if self.training:  # HF-Mamba's instance norm needs > 1 voxel in training
            for stage in self.hfm.keys():
                stage_shape = [s // (1 << (int(stage) - 1)) for s in spatial]
                voxels = 1
                for s in stage_shape:
                    voxels *= s
                if voxels <= 1:
                    raise ValueError(
                        f"VNet with HF-Mamba at encoder stage {stage} needs more than one voxel there in training: "
                        f"input {_shape_str(spatial)} gives {_shape_str(stage_shape)}; use at least "
                        f"{1 << int(stage)} voxels along one axis"
                    )
        cond_dim = self.cond_dim
        if cond_dim is None:
            if cond is not None:
                raise ValueError("cond was given but this VNet was built with cond_dim=None")
        elif cond is None or cond.dim() != 2 or cond.shape[0] != x.shape[0] or cond.shape[1] != cond_dim:
            got = "None" if cond is None else _shape_str(list(cond.shape))
            raise ValueError(f"VNet built with cond_dim={cond_dim} needs cond of shape (B, cond_dim), got {got}")

    def _stage(self, index: int, h: torch.Tensor, emb: Optional[torch.Tensor]) -> torch.Tensor:
        """Encoder stage ``index`` (1..5) after its conv block: FiLM (if conditioned), then HF-Mamba (if placed).

        Loops over the (few) FiLM layers and HF-Mamba modules instead of indexing them, so that TorchScript
        compiles it.
        """
        if self.film is not None and emb is not None:
            for i, film in enumerate(self.film):
                if i == index - 1:
                    scale, shift = film(emb).chunk(2, dim=1)
                    shape = list(scale.shape) + [1] * self.spatial_dims
                    h = h * (1 + scale.view(shape)) + shift.view(shape)
        for key, hfm in self.hfm.items():
            if key == str(index):
                h = h + hfm(h)  # residual: eq. 10's high-pass output adds detail, it does not replace f
        return h

    def forward(
        self, x: torch.Tensor, cond: Optional[torch.Tensor] = None, return_features: bool = False
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Segment ``x``.

        Args:
            x: (B, in_channels, *S), every spatial size divisible by 16.
            cond: (B, cond_dim) conditioning vector, required iff the net was built with ``cond_dim``.
            return_features: also return the last decoder feature map.

        Returns:
            logits (B, out_channels, *S), or ``(logits, features)`` with features (B, n_filters, *S): the map
            that ``out_conv`` reads (after the last-map dropout, when enabled), used by the projection head.
        """
        self._check_input(x, cond)
        emb = F.silu(cond) if cond is not None else None
        x1 = self._stage(1, self.block_one(x), emb)
        x2 = self._stage(2, self.block_two(self.block_one_dw(x1)), emb)
        x3 = self._stage(3, self.block_three(self.block_two_dw(x2)), emb)
        x4 = self._stage(4, self.block_four(self.block_three_dw(x3)), emb)
        x5 = self.dropout(self._stage(5, self.block_five(self.block_four_dw(x4)), emb))

        x6 = self.block_six(self.block_five_up(x5) + x4)
        x7 = self.block_seven(self.block_six_up(x6) + x3)
        x8 = self.block_eight(self.block_seven_up(x7) + x2)
        features = self.dropout(self.block_nine(self.block_eight_up(x8) + x1))
        logits = self.out_conv(features)
        if return_features:
            return logits, features
        return logits
