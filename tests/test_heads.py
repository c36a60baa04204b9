"""Tests for the projection head (diffcl_algo.networks.heads)."""

from __future__ import annotations

import pytest
import torch

from diffcl_algo.networks.heads import ProjectionHead


@pytest.mark.parametrize(
    "spatial_dims, hidden, norm", [(3, None, "batch"), (3, 32, "instance"), (2, 8, "none"), (2, None, "batch")]
)
def test_unit_norm_embeddings(spatial_dims: int, hidden: int | None, norm: str) -> None:
    torch.manual_seed(0)
    head = ProjectionHead(spatial_dims, in_channels=4, out_channels=16, hidden_channels=hidden, norm=norm)
    x = torch.randn(2, 4, *([8] * spatial_dims))
    z = head(x)
    assert z.shape == (2, 16, *([8] * spatial_dims))
    torch.testing.assert_close(z.norm(dim=1), torch.ones(2, *([8] * spatial_dims)))
    z.sum().backward()
    assert all(p.grad is not None for p in head.parameters())


def test_hidden_width_and_bad_norm() -> None:
    head = ProjectionHead(3, in_channels=4, out_channels=16, hidden_channels=32, norm="none")
    assert sum(p.numel() for p in head.parameters()) == (4 * 32 + 32) + (32 * 16 + 16)
    with pytest.raises(ValueError, match="norm"):
        ProjectionHead(norm="layer")
