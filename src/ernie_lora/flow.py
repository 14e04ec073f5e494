"""Flow matching as ERNIE-Image's pipeline and scheduler define it (how the DiT is called: the family).

The pipeline integrates ``x <- x + (sigma_next - sigma) * v`` from sigma = 1 (noise) to 0 (image)
with ``FlowMatchEulerDiscreteScheduler`` and calls the transformer with ``timestep = sigma * 1000``
(``num_train_timesteps``). So the noisy input is ``x_sigma = (1 - sigma) * x0 + sigma * noise`` and
the velocity the transformer predicts is ``noise - x0``.

At inference the scheduler shifts the linear sigma schedule with ``shift * s / (1 + (shift - 1) * s)``
(its ``config.shift``); training can sample sigmas with the same shift so that it spends its steps
where sampling does.
"""

from __future__ import annotations

import torch


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The scheduler's static shift; shift > 1 moves mass toward high noise."""
    if shift == 1.0:
        return sigmas
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sample_sigmas(
    batch_size: int,
    generator: torch.Generator,
    sampling: str = "logit_normal",
    shift: float = 1.0,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> torch.Tensor:
    """Draw training sigmas in (0, 1).

    - ``uniform``: sigma ~ U(0, 1);
    - ``logit_normal``: sigma = sigmoid(N(mean, std)) (SD3's default; more weight mid-trajectory);
    - ``shift``: then applies the scheduler shift (e.g. the official one from the model's scheduler).
    """
    if sampling == "uniform":
        sigmas = torch.rand(batch_size, generator=generator)
    elif sampling == "logit_normal":
        sigmas = torch.sigmoid(logit_mean + logit_std * torch.randn(batch_size, generator=generator))
    else:
        raise ValueError(f"unknown timestep sampling {sampling!r}")
    return shift_sigmas(sigmas, shift).clamp(1e-5, 1.0)


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    s = sigmas.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0
