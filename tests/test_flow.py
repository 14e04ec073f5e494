import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from ernie_lora.flow import noisy_latents, sample_sigmas, shift_sigmas, velocity_target
from ernie_lora.models import ERNIE_IMAGE


def test_shift_and_timesteps_match_the_pipeline_scheduler():
    # ErnieImagePipeline: sigmas = linspace(1, 0, n + 1)[:-1] passed to set_timesteps, which applies the shift
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    base = torch.linspace(1.0, 0.0, 9)[:-1]
    scheduler.set_timesteps(sigmas=base.numpy())
    torch.testing.assert_close(scheduler.sigmas[:-1], shift_sigmas(base, 3.0))
    torch.testing.assert_close(scheduler.timesteps, ERNIE_IMAGE.model_timesteps(shift_sigmas(base, 3.0)))


def test_velocity_convention_matches_the_euler_step():
    """One scheduler step from sigma to 0 with the true velocity lands on the clean latent."""
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 4, 3, 3, generator=g), torch.randn(1, 4, 3, 3, generator=g)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    scheduler.set_timesteps(sigmas=[0.7])
    x_t = noisy_latents(x0, noise, torch.tensor([0.7]))
    out = scheduler.step(velocity_target(x0, noise), scheduler.timesteps[0], x_t).prev_sample
    torch.testing.assert_close(out, x0, rtol=1e-5, atol=1e-5)


def test_sigma_sampling_distributions():
    g = torch.Generator().manual_seed(0)
    uniform = sample_sigmas(20000, g, "uniform")
    logit = sample_sigmas(20000, g, "logit_normal")
    shifted = sample_sigmas(20000, g, "logit_normal", shift=3.0)
    assert abs(uniform.mean() - 0.5) < 0.01 and abs(uniform.std() - (1 / 12) ** 0.5) < 0.01
    assert abs(logit.median() - 0.5) < 0.01 and logit.std() < uniform.std()  # mass in the middle
    assert abs(shifted.median() - 0.75) < 0.01  # shift 3 maps the median 0.5 to 0.75
    assert 0 < float(shifted.min()) and float(shifted.max()) <= 1
    # same generator state, same draws: what exact resume relies on
    a = sample_sigmas(4, torch.Generator().manual_seed(9))
    b = sample_sigmas(4, torch.Generator().manual_seed(9))
    assert torch.equal(a, b)
