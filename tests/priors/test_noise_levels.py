"""The sigma <-> DDPM-step map used on every UNet call."""

import numpy as np
import torch
from diffusers import DDPMScheduler

from dreamflow.priors.noise_levels import DdpmNoiseLevels


def test_step_of_sigma_inverts_sigma_and_matches_numpy_interpolation():
    levels = DdpmNoiseLevels(DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod)
    t = torch.linspace(0.0, 0.999, 257, dtype=torch.float64)
    sigma = levels.sigma(t)
    steps = levels.step_of_sigma(sigma)
    assert torch.allclose(steps.double(), t * 1000, atol=2e-2)
    probe = torch.tensor([1e-4, 0.05, 0.9, 3.3, 14.0, 99.0])
    expected = np.interp(probe.double().numpy(), levels.sigmas.numpy(), np.arange(levels.num_steps, dtype=np.float64))
    assert np.allclose(levels.step_of_sigma(probe).numpy(), expected, atol=1e-3)
    assert steps.dtype == torch.float32 and steps.device == sigma.device
