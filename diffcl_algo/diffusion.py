"""Gaussian diffusion of one-hot labels: noise schedule, forward noising (eq. 1, 5) and DDIM sampling (eq. 2-3)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.networks.schedulers.scheduler import NoiseSchedules
from torch import nn

__all__ = ["DiffusionSegmenter", "GaussianDiffusion"]

SCHEDULES = ("cosine", "linear")


def _randn(shape: Sequence[int], like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise of ``shape`` on ``like``'s device and dtype, drawn from ``generator`` when given."""
    device = generator.device if generator is not None else like.device
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=like.dtype).to(like.device)


class GaussianDiffusion:
    """Discrete Gaussian diffusion with ``T`` steps on one-hot segmentation maps.

    Convention: ``alphas_cumprod`` has length ``T + 1``; ``abar[0] = 1`` (clean) and ``abar[t]`` for ``t`` in
    ``1..T`` is ``prod_{i<=t} (1 - beta_i)`` (paper section 3.1). Training draws ``t ~ Uniform{1..T}``.

    Schedules (betas from MONAI's ``NoiseSchedules``):

    - ``"cosine"`` (default; Nichol & Dhariwal 2021): ``abar(t) = f(t) / f(0)``,
      ``f(t) = cos(((t / T + s) / (1 + s)) pi / 2)^2``, ``s = 0.008``, betas clipped at 0.999;
      ``abar[T]`` is ~2.4e-9 at ``T = 1000`` (linear: ~4e-5).
    - ``"linear"`` (Ho et al. 2020): betas linear from ``1e-4 * 1000 / T`` to ``0.02 * 1000 / T`` (DDPM's
      values at ``T = 1000``, scaled as Improved DDPM does for other ``T``), clipped at 0.999.

    The diffused signal ``Y_0`` is the one-hot map itself (the paper: values in ``{0, 1}``).

    Args:
        timesteps: number of diffusion steps ``T``.
        schedule: ``"cosine"`` or ``"linear"``.

    Attributes:
        betas: (T,) float64, ``betas[t - 1]`` is beta_t.
        alphas_cumprod: (T + 1,) float64, ``abar_t`` indexed by ``t`` in 0..T.
    """

    def __init__(self, timesteps: int = 1000, schedule: str = "cosine") -> None:
        if timesteps < 1:
            raise ValueError(f"timesteps must be >= 1, got {timesteps}")
        if schedule == "cosine":
            betas = NoiseSchedules["cosine"](timesteps)[0]
        elif schedule == "linear":
            scale = 1000.0 / timesteps
            betas = NoiseSchedules["linear_beta"](timesteps, beta_start=1e-4 * scale, beta_end=0.02 * scale)
        else:
            raise ValueError(f"unknown schedule {schedule!r}, expected one of {SCHEDULES}")
        self.timesteps = timesteps
        self.schedule = schedule
        self.betas = betas.double().clamp(0.0, 0.999)
        self.alphas_cumprod = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1.0 - self.betas, 0)])

    def _abar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``abar_t`` for timesteps ``t`` (B,), shaped (B, 1, ..., 1) to broadcast over ``like`` (B, C, *S)."""
        if t.ndim != 1 or t.shape[0] != like.shape[0]:
            raise ValueError(f"t must have shape (B,) = ({like.shape[0]},), got {tuple(t.shape)}")
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(f"t must be an integer tensor, got {t.dtype}")
        if bool((t < 0).any()) or bool((t > self.timesteps).any()):
            raise ValueError(f"t must be in 0..{self.timesteps}, got values in [{int(t.min())}, {int(t.max())}]")
        abar = self.alphas_cumprod.to(like.device)[t.to(like.device)].to(like.dtype)
        return abar.view((-1,) + (1,) * (like.ndim - 1))

    def sample_timesteps(
        self,
        batch: int,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
        low: int = 1,
    ) -> torch.Tensor:
        """Draw training timesteps ``t ~ Uniform{low..T}`` (the paper: ``low = 1``).

        Args:
            batch: number of timesteps ``B``.
            device: device of the result.
            generator: optional random generator (its device is used for drawing).
            low: smallest timestep drawn, in 1..T.

        Returns:
            (B,) int64 in low..T.
        """
        if not 1 <= low <= self.timesteps:
            raise ValueError(f"low must be in 1..{self.timesteps}, got {low}")
        draw_device = generator.device if generator is not None else device
        t = torch.randint(low, self.timesteps + 1, (batch,), generator=generator, device=draw_device)
        return t.to(device) if device is not None else t

    def q_sample(self, y0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Forward noising (eq. 1 / eq. 5): ``Y_t = sqrt(abar_t) Y_0 + sqrt(1 - abar_t) eps``.

        Args:
            y0: clean (one-hot) maps (B, C, *S).
            t: timesteps (B,) integers in 0..T (``t = 0`` returns ``y0``).
            noise: ``eps`` (B, C, *S); standard normal when ``None``.

        Returns:
            ``Y_t`` (B, C, *S), same dtype as ``y0``.
        """
        if noise is None:
            noise = torch.randn_like(y0)
        elif noise.shape != y0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} must equal y0 shape {tuple(y0.shape)}")
        abar = self._abar(t, y0)
        return abar.sqrt() * y0 + (1.0 - abar).sqrt() * noise

    @torch.no_grad()
    def ddim_sample(
        self,
        model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
        x: torch.Tensor,
        num_classes: int,
        steps: int = 10,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """DDIM sampling of a segmentation conditioned on the image ``x`` (eq. 2-3), with an x0-predicting model.

        Timesteps ``tau_1 < ... < tau_S = T`` are ``round(i T / S)``; ``tau_0 = 0`` (``abar = 1``). Starting from
        ``Y_T ~ N(0, I)`` of shape (B, num_classes, *S), each step calls ``model(x, Y_t, t)`` -> logits and sets
        ``x0_hat = softmax(logits)`` (the clean signal's estimate), ``eps_hat = (Y_t - sqrt(abar_t) x0_hat) /
        sqrt(1 - abar_t)`` (eq. 3 solved for eps) and, with ``s = tau_{i-1}``,
        ``sigma = eta sqrt((1 - abar_s) / (1 - abar_t)) sqrt(1 - abar_t / abar_s)``,
        ``Y_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps_hat + sigma z`` (eq. 2 for ``eta = 0``).
        The model's train/eval mode is left as the caller set it; gradients are disabled.

        Args:
            model: ``model(x, y_t, t)`` with x (B, *, *S), y_t (B, num_classes, *S), t (B,) int64 -> logits
                (B, num_classes, *S), e.g. :class:`~diffcl_algo.networks.diffusion_seg.DiffusionSegNet`.
            x: conditioning image (B, C_in, *S).
            num_classes: channels of the segmentation ``Y``.
            steps: number of DDIM steps ``S`` (1..T).
            eta: 0 for deterministic DDIM, 1 for DDPM-like ancestral noise.
            generator: optional random generator for ``Y_T`` and the ``eta > 0`` noise.

        Returns:
            the last step's class probabilities ``softmax(logits)`` (B, num_classes, *S), summing to 1 over dim 1.
        """
        if not 1 <= steps <= self.timesteps:
            raise ValueError(f"steps must be in 1..{self.timesteps}, got {steps}")
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        taus = torch.linspace(0, self.timesteps, steps + 1, dtype=torch.float64).round().long().tolist()
        batch = x.shape[0]
        y = _randn((batch, num_classes, *x.shape[2:]), x, generator)
        for t, s in zip(reversed(taus[1:]), reversed(taus[:-1])):
            t_batch = torch.full((batch,), t, dtype=torch.long, device=x.device)
            probs = torch.softmax(model(x, y, t_batch), dim=1)
            x0_hat = probs
            abar_t = float(self.alphas_cumprod[t])
            abar_s = float(self.alphas_cumprod[s])
            eps_hat = (y - abar_t**0.5 * x0_hat) / (1.0 - abar_t) ** 0.5
            sigma = eta * ((1.0 - abar_s) / (1.0 - abar_t) * (1.0 - abar_t / abar_s)) ** 0.5
            y = abar_s**0.5 * x0_hat + max(1.0 - abar_s - sigma**2, 0.0) ** 0.5 * eps_hat
            if sigma > 0:
                y = y + sigma * _randn(y.shape, y, generator)
        return probs


class DiffusionSegmenter(nn.Module):
    """The DS as a segmenter of the image alone: DDIM from pure noise (eq. 2-3), ``forward(x) -> log-probabilities``.

    What the DS predicts when it is given no label, to compare with the CS (the paper infers with the CS only). Every
    call draws ``Y_T`` from a generator seeded with ``seed``, so a sliding-window evaluation is deterministic.

    Args:
        network: the DS, ``network(x, y_t, t) -> logits`` (``DiffusionSegNet``).
        diffusion: its ``GaussianDiffusion``.
        num_classes: classes of the segmentation.
        steps: DDIM steps.
        seed: seed of ``Y_T``.
    """

    def __init__(
        self, network: nn.Module, diffusion: GaussianDiffusion, num_classes: int, steps: int = 10, seed: int = 0
    ) -> None:
        super().__init__()
        self.network, self.diffusion = network, diffusion
        self.num_classes, self.steps, self.seed = int(num_classes), int(steps), int(seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, *S) image -> (B, num_classes, *S) log class probabilities (softmax gives them back)."""
        generator = torch.Generator(device=x.device).manual_seed(self.seed)
        probs = self.diffusion.ddim_sample(self.network, x, self.num_classes, self.steps, generator=generator)
        return probs.clamp_min(1e-8).log()
