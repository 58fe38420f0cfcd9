"""The method's math pinned on the Gaussian-mixture prior, whose denoiser is exact."""

import math

import pytest
import torch

from dreamflow.methods.loop import Distillation, LoopConfig, Method
from dreamflow.methods.noise import FreshNoise
from dreamflow.methods.schedules import StepInfo, TimestepSchedule
from dreamflow.methods.targets import ApfoTarget, ScoreDistillationTarget, TargetContext
from dreamflow.pipeline.image2d import ParticleProblem
from dreamflow.priors.base import IdentityScoreModel
from dreamflow.priors.gmm import GaussianMixturePrior
from dreamflow.priors.noise_levels import stable_diffusion_noise_levels
from dreamflow.priors.score_models import EmpiricalScoreModel


def small_prior(modes=3, std=0.05, seed=0):
    return GaussianMixturePrior.random((3, 6, 6), modes=modes, std=std, seed=seed)


def test_sigma_table_matches_method_md():
    levels = stable_diffusion_noise_levels()
    expected = {999: 14.61, 980: 13.04, 800: 5.11, 500: 1.62, 400: 1.16, 300: 0.83, 200: 0.57, 100: 0.34, 20: 0.14}
    for step, sigma in expected.items():
        assert float(levels.sigma(step / 1000)) == pytest.approx(sigma, abs=0.006)
    mid = float(levels.sigma(0.5005))
    assert float(levels.sigma(0.5)) < mid < float(levels.sigma(0.501))


def test_mixture_denoiser_is_tweedie():
    # D(x) = x + sigma^2 grad log p_sigma(x) for the mixture smoothed to variance s^2 + sigma^2.
    prior = small_prior()
    x = (0.5 + 0.3 * torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(1))).double().requires_grad_()
    sigma = 0.3
    var = prior.std ** 2 + sigma ** 2
    mu = prior.means.double().reshape(3, -1)
    d2 = ((x.reshape(4, 1, -1) - mu[None]) ** 2).sum(-1)
    logp = torch.logsumexp(prior.log_weights[None] - d2 / (2 * var), dim=1).sum()
    (grad,) = torch.autograd.grad(logp, x)
    expected = x + sigma ** 2 * grad
    got = prior.denoise_components(x.detach(), torch.tensor(sigma), [0, 1, 2])
    assert torch.allclose(got, expected.detach(), atol=1e-9)


def test_guidance_conventions_agree():
    prior = small_prior()
    cond = prior.condition("mode1", guidance=7.5)
    x = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor(1.0)
    d_c = prior.denoise_components(x, sigma, [1])
    d_u = prior.denoise_components(x, sigma, [0, 1, 2])
    w = 7.5 - 1.0  # the paper's w
    paper = (1 + w) * d_c - w * d_u
    assert torch.allclose(prior.denoise(x, sigma, cond), paper, atol=1e-5)
    assert torch.allclose(prior.denoise(x, sigma, cond, guidance=1.0), d_c)
    assert torch.allclose(prior.denoise(x, sigma, cond, guidance=0.0), d_u, atol=1e-6)
    neg = prior.condition("mode1", negative_prompt="mode2", guidance=3.0)
    assert torch.allclose(prior.denoise(x, sigma, neg),
                          prior.denoise_components(x, sigma, [2]) + 3.0 * (d_c - prior.denoise_components(x, sigma, [2])),
                          atol=1e-5)
    with pytest.raises(ValueError, match="mode0"):
        prior.condition("a cat")


def _ctx(prior, model, cond, gen_seed=0):
    return TargetContext(prior, model, cond, None, FreshNoise(), None, torch.Generator().manual_seed(gen_seed))


def test_one_apfo_step_moves_towards_the_data():
    prior = GaussianMixturePrior(torch.full((1, 3, 6, 6), 0.7), std=0.05)
    cond = prior.condition("")
    x = torch.full((1, 3, 6, 6), 0.1)
    model = EmpiricalScoreModel(std=0.05)
    step = StepInfo(0, 0.5, 0.45, 0.5)
    out = ApfoTarget()(x, step, _ctx(prior, model, cond))
    before = (x - 0.7).norm()
    after = (out.target - 0.7).norm()
    assert after < before
    # With one particle and matched kernel width the step is exact and noise-free:
    # x_hat = x + lam * sigma^2 / (s^2 + sigma^2) (mu - x).
    s1, s2 = prior.sigma(0.5), prior.sigma(0.45)
    lam = (s1 - s2) / s1
    expected = x + lam * s1 ** 2 / (0.05 ** 2 + s1 ** 2) * (0.7 - x)
    assert torch.allclose(out.target, expected, atol=1e-5)


def test_score_distillation_factor_is_sds_weight():
    # SDS gradient w(t) (eps_p - n) with w = 1 - abar equals (w / sigma) (x - D_p).
    prior = small_prior()
    cond = prior.condition("")
    x = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    step = StepInfo(0, 0.6, 0.6, 0.6)
    gen = torch.Generator().manual_seed(9)
    n = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    out = ScoreDistillationTarget()(x, step, TargetContext(prior, IdentityScoreModel(), cond, None, FreshNoise(), None, gen))
    sigma = prior.sigma(0.6)
    abar = 1 / (1 + sigma ** 2)
    x_t = (x + sigma * n) * abar.sqrt()  # DDPM form of the same noisy sample
    d_p = prior.denoise(x + sigma * n, sigma, cond)
    eps_p = (x_t - abar.sqrt() * d_p) / (1 - abar).sqrt()
    grad = (1 - abar) * (eps_p - n)
    assert torch.allclose(x - out.target, grad, atol=1e-5)


def test_apfo_dense_schedule_ends_near_a_mode():
    prior = small_prior(modes=3, std=0.05)
    cond = prior.condition("")
    particles = 0.05 * torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(4))
    problem = ParticleProblem(particles, lr=8.0)  # SGD, lr = batch: x <- x_hat exactly
    method = Method("apfo", ApfoTarget(), TimestepSchedule("decreasing", 1.0, 0.0, 1), FreshNoise())
    loop = Distillation(problem, method, prior, EmpiricalScoreModel(std=0.05), cond, None,
                        LoopConfig(iterations=200, optimiser="sgd"), seed=0)
    history = loop.run()
    assert len(history) == 200 and all(math.isfinite(r.loss) for r in history)
    modes, dist = prior.nearest_mode(problem.particles.detach())
    assert float(dist.max()) < 3 * prior.std
    assert len(set(modes.tolist())) >= 2  # the particles spread over modes, not one
    # Black particles started a long way from every mode.
    _, start = prior.nearest_mode(particles)
    assert float(start.min()) > 5 * prior.std


def test_schedule_plans():
    dec = TimestepSchedule("decreasing", 1.0, 0.2, 5)
    plan = dec.plan(100)
    ts = [p.t for p in plan]
    assert ts[0] == 1.0 and all(a >= b for a, b in zip(ts, ts[1:]))
    assert all(len({p.t for p in plan[i:i + 5]}) == 1 for i in range(0, 100, 5))
    assert plan[-1].t_next == pytest.approx(0.2) and all(p.t_next < p.t for p in plan)
    assert dec.timesteps(100) == 20 and dec.spacing(100) == pytest.approx(40.0)
    sq = TimestepSchedule("decreasing", 1.0, 0.2, 1, curve="sqrt").plan(50)
    lin = TimestepSchedule("decreasing", 1.0, 0.2, 1).plan(50)
    assert sum(p.t < 0.4 for p in sq) > sum(p.t < 0.4 for p in lin)
    uni = TimestepSchedule("uniform", 0.98, 0.02).plan(500, seed=3)
    assert all(0.02 <= p.t <= 0.98 and 0.02 <= p.t_score <= 0.98 for p in uni)
    assert uni == TimestepSchedule("uniform", 0.98, 0.02).plan(500, seed=3)
    assert uni != TimestepSchedule("uniform", 0.98, 0.02).plan(500, seed=4)
    ann = TimestepSchedule("annealed", 0.98, 0.02, anneal_at=0.25, anneal_t_max=0.5).plan(400)
    assert max(p.t for p in ann[:100]) > 0.5 and max(p.t for p in ann[100:]) <= 0.5
    with pytest.raises(ValueError):
        TimestepSchedule("decreasing", 0.2, 0.8)


def test_empirical_score_model_memory():
    model = EmpiricalScoreModel(std=0.1, memory=3)
    assert model.trainable and not EmpiricalScoreModel(std=0.1).trainable
    a, b = torch.zeros(2, 3, 2, 2), torch.ones(2, 3, 2, 2)
    model.update(a, torch.tensor(1.0), None)
    model.update(b, torch.tensor(1.0), None)
    assert model.bank.shape[0] == 3 and torch.equal(model.bank[:2], b)  # newest first, oldest dropped
    x = torch.full((1, 3, 2, 2), 0.9)
    reference = GaussianMixturePrior(torch.cat([x, model.bank]), std=0.1)
    got = model.denoise(x + 0.3, torch.tensor(0.5), None, x_clean=x)
    assert torch.allclose(got, reference.denoise_components(x + 0.3, torch.tensor(0.5), range(4)), atol=1e-6)
    restored = EmpiricalScoreModel(std=0.1, memory=3)
    restored.load_state_dict(model.state_dict())
    assert torch.equal(restored.bank, model.bank)
