"""Tests of the high-pass filter, GSC, ToM and the HF-Mamba module (eq. 10) in diffcl_algo.networks.hf_mamba."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from diffcl_algo.networks.hf_mamba import GatedSpatialConv, HFMamba, TriOrientedMamba, high_pass


def _checkerboard(shape: tuple[int, ...]) -> torch.Tensor:
    grids = torch.meshgrid(*[torch.arange(n) for n in shape], indexing="ij")
    return (-1.0) ** sum(grids).double()


@pytest.mark.parametrize("shape", [(6, 8, 4), (7, 5, 6), (8, 6)])
def test_high_pass_removes_constant(shape: tuple[int, ...]) -> None:
    x = torch.full((2, 3, *shape), 4.2, dtype=torch.float64)
    for hf in (0.3, 0.7, 1.0):
        torch.testing.assert_close(high_pass(x, hf), torch.zeros_like(x), atol=1e-12, rtol=0)


@pytest.mark.parametrize("shape", [(6, 8, 4), (8, 6)])
def test_high_pass_keeps_checkerboard(shape: tuple[int, ...]) -> None:
    x = _checkerboard(shape).expand(2, 3, *shape)
    torch.testing.assert_close(high_pass(x, 0.5), x, atol=1e-12, rtol=0)
    torch.testing.assert_close(high_pass(x + 3.0, 1.0), x, atol=1e-12, rtol=0)  # hf = 1 removes only the mean


def test_high_pass_edges_and_dtype() -> None:
    x = torch.randn(2, 3, 7, 6, 5)
    out = high_pass(x, 0.6)
    assert out.shape == x.shape and out.dtype == torch.float32 and not out.is_complex()
    torch.testing.assert_close(high_pass(x, 0.0), torch.zeros_like(x))
    torch.testing.assert_close(high_pass(x, -1.0), torch.zeros_like(x))
    torch.testing.assert_close(high_pass(x, 1.5), x, atol=1e-5, rtol=1e-5)
    assert high_pass(x.half(), 0.6).dtype == torch.float16


def test_high_pass_matches_numpy_band() -> None:
    """Against numpy: explicit band max_i |2 f_i / n_i| > 1 - hf on the unshifted spectrum."""
    rng = np.random.default_rng(0)
    shape = (6, 7, 5)
    x = rng.standard_normal((1, 2, *shape))
    hf = 0.55
    freqs = np.meshgrid(*[np.abs(np.fft.fftfreq(n)) * 2 for n in shape], indexing="ij")
    band = np.maximum.reduce(freqs) > 1 - hf
    expected = np.fft.ifftn(np.fft.fftn(x, axes=(2, 3, 4)) * band, axes=(2, 3, 4)).real
    np.testing.assert_allclose(high_pass(torch.from_numpy(x), hf).numpy(), expected, atol=1e-12)


def test_high_pass_cosine_threshold() -> None:
    """A cosine at integer frequency f along an axis of size n passes iff 2 f / n > 1 - hf."""
    n = 16
    ramp = torch.arange(n, dtype=torch.float64)
    for f in (2, 5, 8):
        wave = torch.cos(2 * torch.pi * f * ramp / n).expand(1, 1, 4, n)
        for hf in (0.3, 0.5, 0.8):
            expected = wave if 2 * f / n > 1 - hf else torch.zeros_like(wave)
            torch.testing.assert_close(high_pass(wave, hf), expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("spatial_dims,gate", [(2, "mul"), (3, "add")])
def test_gated_spatial_conv(spatial_dims: int, gate: str) -> None:
    block = GatedSpatialConv(spatial_dims, 4, gate=gate)
    x = torch.randn(2, 4, *([6] * spatial_dims))
    assert block(x).shape == x.shape
    with pytest.raises(ValueError):
        GatedSpatialConv(spatial_dims, 4, gate="max")


class _Record(nn.Module):
    """Identity that remembers its input (stands in for a Mamba block)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = x.clone()
        return x


def test_tri_oriented_orders_match_segmamba() -> None:
    spatial = (3, 4, 2)
    length = 24
    tom = TriOrientedMamba(channels=2, d_state=4)
    tom.mamba_forward, tom.mamba_backward, tom.mamba_slice = _Record(), _Record(), _Record()
    tokens = torch.arange(length, dtype=torch.float32)[None, :, None].repeat(1, 1, 2)  # value = flat index
    out = tom(tokens, spatial)
    torch.testing.assert_close(out, 3 * tokens)  # each order is mapped back before the sum
    torch.testing.assert_close(tom.mamba_backward.seen[0, :, 0], torch.arange(length - 1, -1, -1.0))
    # SegMamba bimamba v3: xz.chunk(nslices, dim=-1) -> stack(dim=-1) -> flatten, nslices = spatial[0]
    seq = torch.arange(length, dtype=torch.float32)
    segmamba = torch.stack(seq.chunk(spatial[0], dim=-1), dim=-1).flatten()
    torch.testing.assert_close(tom.mamba_slice.seen[0, :, 0], segmamba)


@pytest.mark.parametrize("spatial_dims,shape", [(2, (6, 5)), (3, (4, 5, 3))])
def test_hf_mamba_shapes_and_gradients(spatial_dims: int, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    block = HFMamba(spatial_dims=spatial_dims, channels=8, hf=0.7, d_state=4, mlp_ratio=2.0)
    x = torch.randn(2, 8, *shape, requires_grad=True)
    out = block(x)
    assert out.shape == x.shape
    assert not torch.allclose(out, x)
    out.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in block.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_hf_mamba_parameter_count() -> None:
    assert sum(p.numel() for p in HFMamba(channels=256).parameters()) == 5_248_256
    with pytest.raises(ValueError):
        HFMamba(spatial_dims=1, channels=8)
