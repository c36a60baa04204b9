"""Tests for the field's V-Net (diffcl_algo.networks.vnet)."""

from __future__ import annotations

import pytest
import torch

from diffcl_algo.networks.hf_mamba import HFMamba
from diffcl_algo.networks.vnet import VNet


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    "spatial_dims, size, norm",
    [(3, (16, 16, 32), "batch"), (3, (32, 32, 16), "instance"), (2, (32, 48), "group"), (2, (16, 16), "none")],
)
def test_shapes_and_features(spatial_dims: int, size: tuple[int, ...], norm: str) -> None:
    torch.manual_seed(0)
    net = VNet(spatial_dims, in_channels=2, out_channels=3, n_filters=4, norm=norm)
    x = torch.randn(2, 2, *size)
    logits = net(x)
    assert logits.shape == (2, 3, *size)
    logits2, features = net(x, return_features=True)
    assert logits2.shape == (2, 3, *size)
    assert features.shape == (2, net.feature_channels, *size) and net.feature_channels == 4


def test_gradient_flows_to_every_parameter() -> None:
    torch.manual_seed(0)
    net = VNet(3, 1, 2, n_filters=4)
    logits, features = net(torch.randn(2, 1, 16, 16, 16), return_features=True)
    (logits.square().mean() + features.mean()).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("norm, expected", [("batch", 9_448_866), ("group", 9_448_866), ("instance", 9_443_266)])
def test_parameter_count_matches_the_field(norm: str, expected: int) -> None:
    # the counts of SSL4MIS / UA-MT `VNet(n_channels=1, n_classes=2, n_filters=16, normalization=...)`
    assert n_params(VNet(3, 1, 2, n_filters=16, norm=norm)) == expected


def test_state_dict_keys_are_the_fields() -> None:
    net = VNet(3, 1, 2, n_filters=4, norm="batch")
    convs = {"one": 1, "two": 2, "three": 3, "four": 3, "five": 3, "six": 3, "seven": 3, "eight": 2, "nine": 1}
    expected = set()
    for block, n in convs.items():
        for i in range(n):  # Sequential of (conv, bn, relu) triples
            expected |= {f"block_{block}.conv.{3 * i}.{k}" for k in ("weight", "bias")}
            expected |= {f"block_{block}.conv.{3 * i + 1}.{k}" for k in ("weight", "bias", "running_mean")}
    for block in ("one_dw", "two_dw", "three_dw", "four_dw", "five_up", "six_up", "seven_up", "eight_up"):
        expected |= {f"block_{block}.conv.0.weight", f"block_{block}.conv.1.running_var"}
    keys = set(net.state_dict())
    assert expected <= keys
    assert {k for k in keys if not k.startswith("block_")} == {"out_conv.weight", "out_conv.bias"}


def test_residual_is_parameter_free_but_changes_the_function() -> None:
    torch.manual_seed(0)
    res = VNet(3, 1, 2, n_filters=4).eval()
    plain = VNet(3, 1, 2, n_filters=4, residual=False).eval()
    plain.load_state_dict(res.state_dict())
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert not torch.allclose(res(x), plain(x))


@pytest.mark.parametrize("size", [(16, 16, 20), (8, 16, 16)])
def test_bad_spatial_size_names_the_shape(size: tuple[int, ...]) -> None:
    net = VNet(3, 1, 2, n_filters=4)
    with pytest.raises(ValueError, match=r"divisible by 16.*" + ", ".join(map(str, size))):
        net(torch.zeros(1, 1, *size))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown norm"):
        VNet(norm="layer")
    for stages in [(0,), (6,), (5, 5)]:
        with pytest.raises(ValueError, match="hfm_stages"):
            VNet(n_filters=4, hfm_stages=stages)
    with pytest.raises(ValueError, match="spatial_dims"):
        VNet(spatial_dims=1)
    with pytest.raises(ValueError, match="dropout"):
        VNet(dropout=1.0)
    with pytest.raises(ValueError, match="input"):
        VNet(3, 1, 2, n_filters=4)(torch.zeros(1, 2, 16, 16, 16))


def test_dropout_is_active_only_in_training() -> None:
    torch.manual_seed(0)
    net = VNet(3, 1, 2, n_filters=4, dropout=0.5)
    x = torch.randn(2, 1, 16, 16, 16)
    assert not torch.allclose(net(x), net(x))
    net.eval()
    assert torch.equal(net(x), net(x))


def test_cond_film_changes_the_output() -> None:
    torch.manual_seed(0)
    net = VNet(3, 1, 2, n_filters=4, cond_dim=8).eval()
    x = torch.randn(2, 1, 16, 16, 16)
    c1, c2 = torch.randn(2, 8), torch.randn(2, 8)
    with torch.no_grad():
        assert torch.equal(net(x, c1), net(x, c1))
        assert not torch.allclose(net(x, c1), net(x, c2))
    with pytest.raises(ValueError, match="cond"):
        net(x)
    with pytest.raises(ValueError, match="cond"):
        net(x, torch.randn(2, 7))
    with pytest.raises(ValueError, match="cond_dim=None"):
        VNet(3, 1, 2, n_filters=4)(x, c1)


def test_hfm_stage_builds_and_runs() -> None:
    torch.manual_seed(0)
    net = VNet(3, 1, 2, n_filters=4, hfm_stages=(5,), hfm_hf=0.7)
    assert list(net.hfm) == ["5"]
    x = torch.randn(2, 1, 32, 32, 32)
    logits, features = net(x, return_features=True)
    assert logits.shape == (2, 2, 32, 32, 32) and features.shape == (2, 4, 32, 32, 32)
    logits.mean().backward()
    assert all(p.grad is not None for p in net.hfm.parameters())


class _Zero(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def test_hfm_joins_as_residual() -> None:
    """``f + F_o``: an HF-Mamba that outputs zeros leaves the CS exactly the plain V-Net."""
    torch.manual_seed(0)
    with_hfm = VNet(3, 1, 2, n_filters=4, hfm_stages=(5,)).eval()
    plain = VNet(3, 1, 2, n_filters=4).eval()
    plain.load_state_dict({k: v for k, v in with_hfm.state_dict().items() if not k.startswith("hfm.")})
    x = torch.randn(1, 1, 32, 32, 32)
    assert not torch.allclose(with_hfm(x), plain(x))
    with_hfm.hfm["5"] = _Zero()
    assert torch.equal(with_hfm(x), plain(x))


def test_hfm_parameter_count() -> None:
    net = VNet(3, 1, 2, n_filters=16, hfm_stages=(5,))
    assert n_params(net) == 9_448_866 + n_params(HFMamba(3, channels=256))
    two = VNet(3, 1, 2, n_filters=4, hfm_stages=(1, 3))
    extra = n_params(HFMamba(3, channels=4)) + n_params(HFMamba(3, channels=16))
    assert n_params(two) == n_params(VNet(3, 1, 2, n_filters=4)) + extra
