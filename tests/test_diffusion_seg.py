"""Tests for the DS network (diffcl_algo.networks.diffusion_seg)."""

from __future__ import annotations

import pytest
import torch

from diffcl_algo.networks.diffusion_seg import DiffusionSegNet


@pytest.mark.parametrize("spatial_dims, size", [(3, (16, 16, 32)), (2, (32, 16))])
def test_output_and_feature_shapes(spatial_dims: int, size: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    net = DiffusionSegNet(spatial_dims, in_channels=1, out_channels=3, n_filters=4, time_embed_dim=8)
    x, y_t = torch.randn(2, 1, *size), torch.randn(2, 3, *size)
    t = torch.tensor([1, 1000])
    assert net(x, y_t, t).shape == (2, 3, *size)
    logits, features = net(x, y_t, t, return_features=True)
    assert logits.shape == (2, 3, *size) and features.shape == (2, 4, *size) and net.feature_channels == 4


def test_output_depends_on_t() -> None:
    torch.manual_seed(0)
    net = DiffusionSegNet(3, 1, 2, n_filters=4, time_embed_dim=8).eval()
    x, y_t = torch.randn(1, 1, 16, 16, 16), torch.randn(1, 2, 16, 16, 16)
    with torch.no_grad():
        out = [net(x, y_t, torch.tensor([t])) for t in (10, 10, 500)]
    assert torch.equal(out[0], out[1])
    assert not torch.allclose(out[0], out[2])


def test_gradient_reaches_time_embedding() -> None:
    torch.manual_seed(0)
    net = DiffusionSegNet(3, 1, 2, n_filters=4, time_embed_dim=8)
    net(torch.randn(2, 1, 16, 16, 16), torch.randn(2, 2, 16, 16, 16), torch.tensor([3, 700])).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.time_mlp.parameters())


def test_parameter_count() -> None:
    net = DiffusionSegNet()  # 3D, 1 -> 2 classes, n_filters 16, batch norm, time_embed_dim 128
    count = sum(p.numel() for p in net.parameters())
    film = sum(p.numel() for p in net.vnet.film.parameters())
    mlp = sum(p.numel() for p in net.time_mlp.parameters())
    assert (count, mlp, film) == (10_287_330, 328_704, 508_896)
    assert count - mlp - film == 9_449_730  # the field's VNet(n_channels=3, n_classes=2, batchnorm)


def test_bad_inputs() -> None:
    net = DiffusionSegNet(3, 1, 2, n_filters=4, time_embed_dim=8)
    x = torch.zeros(1, 1, 16, 16, 16)
    with pytest.raises(ValueError, match="y_t"):
        net(x, torch.zeros(1, 3, 16, 16, 16), torch.tensor([1]))
    with pytest.raises(ValueError, match="t must"):
        net(x, torch.zeros(1, 2, 16, 16, 16), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="time_embed_dim"):
        DiffusionSegNet(time_embed_dim=7)
