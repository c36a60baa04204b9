"""Tests for the label diffusion (diffcl_algo.diffusion): schedule, q_sample (eq. 5), DDIM (eq. 2-3)."""

from __future__ import annotations

import math

import pytest
import torch

from diffcl_algo.diffusion import GaussianDiffusion
from diffcl_algo.networks.diffusion_seg import DiffusionSegNet


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_schedule_shape_and_monotonicity(schedule: str) -> None:
    diff = GaussianDiffusion(1000, schedule)
    abar = diff.alphas_cumprod
    assert abar.shape == (1001,) and diff.betas.shape == (1000,)
    assert abar[0] == 1.0
    assert bool((abar[1:] < abar[:-1]).all())
    assert 0 < abar[-1] < 1e-4
    assert bool((diff.betas > 0).all()) and bool((diff.betas <= 0.999).all())


def test_cosine_schedule_is_nichol_dhariwal() -> None:
    diff = GaussianDiffusion(1000, "cosine")

    def f(t: float) -> float:
        return math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2

    for t in (1, 10, 250, 500, 900):  # far from the beta clipping at the end
        assert diff.alphas_cumprod[t].item() == pytest.approx(f(t) / f(0), rel=1e-4, abs=1e-6)
    assert diff.betas[-1].item() == pytest.approx(0.999)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="schedule"):
        GaussianDiffusion(schedule="quadratic")
    with pytest.raises(ValueError, match="timesteps"):
        GaussianDiffusion(0)
    diff = GaussianDiffusion(10)
    y0 = torch.zeros(2, 2, 4, 4)
    with pytest.raises(ValueError, match="0..10"):
        diff.q_sample(y0, torch.tensor([1, 11]))
    with pytest.raises(ValueError, match="integer"):
        diff.q_sample(y0, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"\(B,\)"):
        diff.q_sample(y0, torch.tensor([1]))


def test_sample_timesteps() -> None:
    diff = GaussianDiffusion(5)
    t = diff.sample_timesteps(2000)
    assert t.dtype == torch.int64 and t.shape == (2000,)
    assert set(t.tolist()) == {1, 2, 3, 4, 5}
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(diff.sample_timesteps(16, "cpu", g1), diff.sample_timesteps(16, "cpu", g2))
    assert set(diff.sample_timesteps(500, low=4).tolist()) == {4, 5}
    with pytest.raises(ValueError, match="low must be in"):
        diff.sample_timesteps(1, low=6)


def test_q_sample_formula_and_broadcasting() -> None:
    diff = GaussianDiffusion(100)
    y0 = torch.nn.functional.one_hot(torch.randint(0, 3, (4, 5, 6, 7)), 3).permute(0, 4, 1, 2, 3).float()
    noise = torch.randn_like(y0)
    t = torch.tensor([0, 1, 50, 100])
    y_t = diff.q_sample(y0, t, noise)
    for b in range(4):
        a = diff.alphas_cumprod[t[b]].item()
        torch.testing.assert_close(y_t[b], math.sqrt(a) * y0[b] + math.sqrt(1 - a) * noise[b])
    torch.testing.assert_close(y_t[0], y0[0])  # t = 0 is clean


@pytest.mark.parametrize("t", [1, 250, 600, 1000])
def test_q_sample_statistics(t: int) -> None:
    torch.manual_seed(0)
    diff = GaussianDiffusion(1000)
    y0 = torch.zeros(2, 2, 128, 128)  # channel 0 is the one-hot "on" class everywhere
    y0[:, 0] = 1.0
    y_t = diff.q_sample(y0, torch.full((2,), t))
    abar = diff.alphas_cumprod[t].item()
    for c, clean in ((0, 1.0), (1, 0.0)):
        samples = y_t[:, c].flatten()
        assert samples.mean().item() == pytest.approx(math.sqrt(abar) * clean, abs=0.02)
        assert samples.var().item() == pytest.approx(1 - abar, abs=0.02)


def test_ddim_sample_with_a_tiny_ds_net() -> None:
    torch.manual_seed(0)
    net = DiffusionSegNet(3, 1, 3, n_filters=4, time_embed_dim=8).eval()
    diff = GaussianDiffusion(1000)
    x = torch.randn(2, 1, 16, 16, 16)
    probs = diff.ddim_sample(net, x, num_classes=3, steps=3)
    assert probs.shape == (2, 3, 16, 16, 16)
    assert bool((probs >= 0).all())
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 16, 16, 16))
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    p1 = diff.ddim_sample(net, x, 3, steps=2, eta=1.0, generator=g1)
    torch.testing.assert_close(p1, diff.ddim_sample(net, x, 3, steps=2, eta=1.0, generator=g2))


def test_ddim_timesteps_and_oracle() -> None:
    diff = GaussianDiffusion(1000)
    target = torch.nn.functional.one_hot(torch.randint(0, 2, (1, 8, 8)), 2).permute(0, 3, 1, 2).float()
    seen: list[tuple[int, torch.Tensor]] = []

    def oracle(x: torch.Tensor, y_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert y_t.shape == (1, 2, 8, 8) and t.dtype == torch.int64
        seen.append((int(t[0]), y_t.clone()))
        return 50.0 * target  # softmax ~ target: x0_hat is the clean label

    probs = diff.ddim_sample(oracle, torch.zeros(1, 1, 8, 8), num_classes=2, steps=4)
    x0_hat = torch.softmax(50.0 * target, 1)
    torch.testing.assert_close(probs, x0_hat)
    assert [t for t, _ in seen] == [1000, 750, 500, 250]
    # deterministic DDIM (eq. 2) with eps from eq. 3: Y_s = sqrt(abar_s) x0 + sqrt(1 - abar_s) eps_hat
    for (t, y_t), (s, y_s) in zip(seen[:-1], seen[1:]):
        a_t, a_s = diff.alphas_cumprod[t].item(), diff.alphas_cumprod[s].item()
        eps_hat = (y_t - math.sqrt(a_t) * x0_hat) / math.sqrt(1 - a_t)
        torch.testing.assert_close(y_s, math.sqrt(a_s) * x0_hat + math.sqrt(1 - a_s) * eps_hat)
    with pytest.raises(ValueError, match="steps"):
        diff.ddim_sample(oracle, torch.zeros(1, 1, 8, 8), 2, steps=0)


def test_ddim_with_a_perfect_x0_model_returns_its_prediction() -> None:
    """A model that always predicts the same map: DDIM ends on it."""
    diffusion = GaussianDiffusion(50)
    target = torch.zeros(1, 2, 4, 4)
    target[:, 1, :2], target[:, 0, 2:] = 1.0, 1.0

    def model(x, y_t, t):
        return 20.0 * (target - 0.5)  # logits of the target

    probs = diffusion.ddim_sample(model, torch.zeros(1, 1, 4, 4), num_classes=2, steps=5)
    assert torch.allclose(probs, torch.softmax(20.0 * (target - 0.5), 1))


def test_diffusion_segmenter_is_deterministic_log_probabilities() -> None:
    from diffcl_algo.diffusion import DiffusionSegmenter
    from diffcl_algo.networks import DiffusionSegNet

    torch.manual_seed(0)
    net = DiffusionSegNet(3, 1, 2, n_filters=4).eval()
    segmenter = DiffusionSegmenter(net, GaussianDiffusion(100), num_classes=2, steps=3, seed=5)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        first, second = segmenter(x), segmenter(x)
    assert first.shape == (1, 2, 16, 16, 16) and torch.equal(first, second)  # the same Y_T every call
    assert torch.allclose(first.exp().sum(1), torch.ones(1, 16, 16, 16), atol=1e-5)
