"""High-frequency Mamba module (HF-Mamba, paper section 4.2, eq. 10) and its SegMamba building blocks.

Eq. 10, in the paper's order, for CS features ``f`` of shape (B, C, *spatial)::

    F_g = FFT(SA(f))                    # SA = SegMamba's gated spatial convolution (GSC)
    F_h = iFFT(HPF(fftshift(F_g)))      # ifftshift before the iFFT, real part
    F_m = SM(LN(F_h)) + F_h             # SM = SegMamba's tri-orientated Mamba (ToM)
    F_o = MLP(LN(F_m)) + F_m

LN, SM and MLP act on the ``L = prod(spatial)`` voxels as tokens of width ``C``. The Mamba blocks are
``diffcl_algo.networks.ssm.Mamba`` (``mamba_ssm``'s CUDA kernels when available, the portable scan otherwise).
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn as nn
from monai.networks.layers.factories import Conv, Norm

from diffcl_algo.networks.ssm import Mamba

__all__ = ["GatedSpatialConv", "HFMamba", "TriOrientedMamba", "high_pass"]


def _high_pass_mask(spatial_shape: List[int], hf: float, device: Optional[torch.device] = None) -> torch.Tensor:
    """Boolean pass-band of the HPF on the *centred* (fftshift-ed) spectrum, shape ``spatial_shape``.

    Along an axis of size ``n``, centred index ``k`` (0..n-1) holds the integer frequency ``f = k - n // 2``
    (the ``fftshift`` layout for even and odd ``n``) and ``nu = 2 f / n``, the frequency as a fraction of the
    Nyquist frequency: ``nu`` runs over ``[-1, 1)`` in steps ``2/n`` for even ``n`` (Nyquist ``f = -n/2`` is
    ``nu = -1``) and over ``[-(n-1)/n, (n-1)/n]`` for odd ``n``. A coefficient passes iff
    ``max_i |nu_i| > 1 - hf``. The band is symmetric under ``f -> -f``, so the filtered signal stays real.
    """
    radius = torch.zeros([], dtype=torch.float64, device=device)
    for axis, n in enumerate(spatial_shape):
        nu = (torch.arange(n, device=device, dtype=torch.float64) - n // 2).abs() * (2.0 / n)
        view = [1] * len(spatial_shape)
        view[axis] = n
        radius = torch.maximum(radius, nu.view(view))
    return radius > 1.0 - hf


def high_pass(x: torch.Tensor, hf: float) -> torch.Tensor:
    """High-pass filter of eq. 10 (second line): ``real(iFFT(ifftshift(HPF(fftshift(FFT(x))))))``.

    Args:
        x: real features, (B, C, *spatial); the FFT runs over all spatial axes.
        hf: fraction of the band kept as "high frequency": a coefficient passes iff its centred frequency
            ``nu`` (per axis ``nu = 2 f / n`` in ``[-1, 1]``, see ``_high_pass_mask``) has
            ``max_i |nu_i| > 1 - hf``. Edge behaviour: ``hf <= 0`` removes everything (output 0); ``hf = 1``
            removes only the DC term (per-channel mean); ``hf > 1`` keeps everything; for even sizes the
            Nyquist components (e.g. the checkerboard ``(-1)^(i+j+k)``) pass for every ``hf > 0``.

    Returns:
        Filtered features, (B, C, *spatial), ``x``'s dtype (float16/bfloat16 are filtered in float32).
    """
    axes = list(range(2, x.dim()))
    xf = x.float() if x.dtype == torch.float16 or x.dtype == torch.bfloat16 else x
    spectrum = torch.fft.fftshift(torch.fft.fftn(xf, dim=axes), dim=axes)  # F_g, centred
    spectrum = spectrum * _high_pass_mask(list(x.shape[2:]), hf, x.device)
    out = torch.fft.ifftn(torch.fft.ifftshift(spectrum, dim=axes), dim=axes).real
    return out.to(x.dtype)


class GatedSpatialConv(nn.Module):
    """SegMamba's gated spatial convolution (GSC), the SA of eq. 10; (B, C, *spatial) -> same shape.

    ``x1 = CNA3(CNA3(x))`` (two 3^d conv-InstanceNorm-ReLU), ``x2 = CNA1(x)`` (1^d conv-norm-ReLU),
    ``out = CNA1(x1 * x2) + x``. Layer names follow SegMamba (``proj``, ``norm``, ``nonliner``, ..., ``proj4``).
    The SegMamba paper gates the branches by a product; its released code adds them: ``gate="add"``.

    Args:
        spatial_dims: 2 or 3.
        channels: input = output channels.
        gate: ``"mul"`` (paper, default) or ``"add"`` (SegMamba's released code).
    """

    def __init__(self, spatial_dims: int, channels: int, gate: str = "mul") -> None:
        super().__init__()
        if gate not in ("mul", "add"):
            raise ValueError(f"gate must be 'mul' or 'add', got {gate!r}.")
        self.gate = gate
        conv, norm = Conv[Conv.CONV, spatial_dims], Norm[Norm.INSTANCE, spatial_dims]
        self.proj, self.norm, self.nonliner = conv(channels, channels, 3, 1, 1), norm(channels), nn.ReLU()
        self.proj2, self.norm2, self.nonliner2 = conv(channels, channels, 3, 1, 1), norm(channels), nn.ReLU()
        self.proj3, self.norm3, self.nonliner3 = conv(channels, channels, 1, 1, 0), norm(channels), nn.ReLU()
        self.proj4, self.norm4, self.nonliner4 = conv(channels, channels, 1, 1, 0), norm(channels), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *spatial) -> (B, C, *spatial)."""
        x1 = self.nonliner(self.norm(self.proj(x)))
        x1 = self.nonliner2(self.norm2(self.proj2(x1)))
        x2 = self.nonliner3(self.norm3(self.proj3(x)))
        gated = x1 * x2 if self.gate == "mul" else x1 + x2
        return self.nonliner4(self.norm4(self.proj4(gated))) + x


class TriOrientedMamba(nn.Module):
    """SegMamba's tri-orientated Mamba (ToM), the SM of eq. 10; tokens (B, L, C) -> (B, L, C).

    The flattened volume (C-order over ``spatial``) is scanned in three orders by three ``Mamba`` blocks with
    separate parameters: forward, reversed, and slice-interleaved; each output is mapped back to the original
    order and the three are summed. The interleaved order moves spatial axis ``slice_axis`` to the fastest
    position, so consecutive tokens come from consecutive slices along that axis at one in-slice position. With
    ``slice_axis=0`` (default) this is SegMamba's ``nslices`` interleave (chunk the sequence into
    ``nslices = spatial[0]`` slices, take one token from each in turn). SegMamba's ``bimamba_type="v3"`` shares
    ``in_proj``/``out_proj`` between the directions; here each direction is a full ``Mamba`` (own projections).

    Args:
        channels: token width C.
        d_state, d_conv, expand: ``Mamba`` arguments.
        slice_axis: spatial axis (0-based, negative allowed) whose slices are interleaved. For (B, C, H, W, D)
            volumes, ``-1`` would reproduce the forward order, so it is not a useful choice.
    """

    def __init__(self, channels: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, slice_axis: int = 0) -> None:
        super().__init__()
        self.slice_axis = slice_axis
        self.mamba_forward = Mamba(channels, d_state=d_state, d_conv=d_conv, expand=expand)
        self.mamba_backward = Mamba(channels, d_state=d_state, d_conv=d_conv, expand=expand)
        self.mamba_slice = Mamba(channels, d_state=d_state, d_conv=d_conv, expand=expand)

    def forward(self, tokens: torch.Tensor, spatial_shape: List[int]) -> torch.Tensor:
        """tokens (B, L, C) with L = prod(spatial_shape), C-order -> (B, L, C)."""
        batch, length, channels = tokens.shape[0], tokens.shape[1], tokens.shape[2]
        axis = 1 + self.slice_axis % len(spatial_shape)
        out = self.mamba_forward(tokens) + self.mamba_backward(tokens.flip(1)).flip(1)
        interleaved = tokens.unflatten(1, list(spatial_shape)).movedim(axis, -2)  # (B, *other, S_axis, C)
        moved_shape = list(interleaved.shape[1:-1])
        scanned = self.mamba_slice(interleaved.reshape(batch, length, channels))
        return out + scanned.unflatten(1, moved_shape).movedim(-2, axis).reshape(batch, length, channels)


class HFMamba(nn.Module):
    """High-frequency Mamba module (eq. 10); (B, C, *spatial) -> (B, C, *spatial).

    ``F_g = FFT(SA(f))``; ``F_h = iFFT(HPF(fftshift(F_g)))`` (see ``high_pass``); ``F_m = SM(LN(F_h)) + F_h``;
    ``F_o = MLP(LN(F_m)) + F_m``, with SA = ``GatedSpatialConv``, SM = ``TriOrientedMamba``, LN =
    ``nn.LayerNorm`` over channels and MLP = Linear(C, C * mlp_ratio), GELU, Linear(C * mlp_ratio, C), all on
    voxel tokens. The module has no outer residual (eq. 10): the input reaches the output only through SA.
    ``HFMamba(channels=256)`` (all defaults) has 5,248,256 parameters (GSC 3,671,040; SM 3 x 437,760; MLP
    262,912; LN 1,024).

    Args:
        spatial_dims: 2 or 3.
        channels: feature channels C; default 256 = the deepest V-Net stage at ``n_filters=16``, the default
            placement.
        hf: HPF band fraction (Table 2 "HF"), see ``high_pass``.
        d_state, d_conv, expand: ``Mamba`` arguments of the three SM directions.
        mlp_ratio: MLP hidden width = ``int(channels * mlp_ratio)``.
        slice_axis: interleaved axis of SM (``TriOrientedMamba``).
        gate: GSC branch combination (``GatedSpatialConv``).
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        channels: int = 256,
        hf: float = 0.7,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        mlp_ratio: float = 2.0,
        slice_axis: int = 0,
        gate: str = "mul",
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        self.hf = hf
        hidden = int(channels * mlp_ratio)
        self.sa = GatedSpatialConv(spatial_dims, channels, gate=gate)
        self.norm1 = nn.LayerNorm(channels)
        self.sm = TriOrientedMamba(channels, d_state=d_state, d_conv=d_conv, expand=expand, slice_axis=slice_axis)
        self.norm2 = nn.LayerNorm(channels)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(), nn.Linear(hidden, channels))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        """f (B, C, *spatial) -> F_o (B, C, *spatial) (eq. 10)."""
        spatial = list(f.shape[2:])
        f_h = high_pass(self.sa(f), self.hf)  # F_g, F_h
        tokens = f_h.flatten(2).transpose(1, 2)  # (B, L, C)
        f_m = self.sm(self.norm1(tokens), spatial) + tokens
        f_o = self.mlp(self.norm2(f_m)) + f_m
        return f_o.transpose(1, 2).reshape(f.shape)
