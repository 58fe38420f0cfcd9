"""The parts of the fair 2D comparison: D_phi that does not presuppose the answer, metrics that
tell collapse from detail, the schedules of DreamFlow's Fig. 14 controls, and APFO's last step."""

import math

import pytest
import torch

from dreamflow.methods.schedules import StepInfo, TimestepSchedule, dreamtime_weight
from dreamflow.methods.noise import NoiseSource
from dreamflow.methods.targets import ApfoTarget, TargetContext, target_sigma
from dreamflow.pipeline.image2d import Image2DConfig, build_score_model, gmm_metrics, method_config
from dreamflow.priors.base import IdentityScoreModel
from dreamflow.priors.gmm import GaussianMixturePrior
from dreamflow.priors.score_models import EmpiricalScoreModel, LearnedScoreModel


def test_empirical_kernel_is_a_setting_not_the_data_std():
    prior = GaussianMixturePrior.random((3, 4, 4), 3, std=0.05)
    default = build_score_model("exact", prior, Image2DConfig(), torch.device("cpu"))
    assert isinstance(default, EmpiricalScoreModel)
    assert default.std <= Image2DConfig().gmm_std / 10  # the default stays far below the modes' width
    for kernel, data_std in ((0.002, 0.05), (0.002, 0.2), (0.01, 0.05)):
        model = build_score_model("exact", prior, Image2DConfig(gmm_std=data_std, phi_kernel=kernel),
                                  torch.device("cpu"))
        assert model.std == kernel
    learned = build_score_model("exact", prior, Image2DConfig(score_model="learned", phi_lr=3e-4),
                                torch.device("cpu"))
    assert isinstance(learned, LearnedScoreModel) and learned.lr == 3e-4
    assert isinstance(build_score_model("identity", prior, Image2DConfig(), torch.device("cpu")), IdentityScoreModel)


def test_learned_score_model_learns_the_renders_and_resumes():
    g = torch.Generator().manual_seed(0)
    data = 0.2 + 0.6 * torch.rand(2, 3, 4, 4, generator=g)          # two "renders"
    x = data.repeat(4, 1, 1, 1)
    model = LearnedScoreModel(hidden=64, lr=3e-3, seed=1)
    sigma = torch.tensor(0.3)
    noisy = x + sigma * torch.randn(x.shape, generator=g)
    untrained = model.denoise(noisy, sigma, None, x_clean=x)
    # Untrained: the denoiser of a Gaussian with the renders' mean and std (zero last layer).
    c = model.scale ** 2 / (model.scale ** 2 + 0.09)
    assert torch.allclose(untrained, model.centre + c * (noisy - model.centre), atol=1e-5)
    losses = [float(model.update(x, sigma, None)) for _ in range(300)]
    assert sum(losses[-20:]) / 20 < 0.5 * sum(losses[:20]) / 20
    trained = model.denoise(noisy, sigma, None, x_clean=x)
    assert (trained - x).pow(2).mean() < 0.5 * (untrained - x).pow(2).mean()
    copy = LearnedScoreModel(hidden=64, lr=3e-3, seed=1)
    copy.load_state_dict(model.state_dict())
    assert torch.equal(copy.denoise(noisy, sigma, None), model.denoise(noisy, sigma, None))


def test_metrics_tell_collapse_and_noise_from_exact_samples():
    prior = GaussianMixturePrior.random((3, 8, 8), 4, std=0.05, seed=1)
    modes = torch.arange(64) % 4
    exact = prior.sample(64, seed=5)
    offset = exact - prior.means[prior.nearest_mode(exact)[0]]
    centres = prior.means[modes]
    noisy = prior.means[prior.nearest_mode(exact)[0]] + 2.0 * offset
    one_mode = prior.means[torch.zeros(64, dtype=torch.long)] + offset
    m_exact, m_centres, m_noisy, m_one = (gmm_metrics(prior, x, seed=2) for x in (exact, centres, noisy, one_mode))
    assert m_exact["spread_ratio"] == pytest.approx(1.0, abs=0.1)
    assert m_centres["spread_ratio"] < 1e-3 and m_noisy["spread_ratio"] == pytest.approx(2.0, abs=0.2)
    assert m_exact["modes_covered"] == m_centres["modes_covered"] == 4 and m_one["modes_covered"] == 1
    assert m_centres["mode_balance"] == pytest.approx(1.0) and m_one["mode_balance"] == 0.0
    assert abs(m_exact["mmd"]) < 0.3 * min(m_centres["mmd"], m_noisy["mmd"], m_one["mmd"])
    # Prompted sub-mixture: particles on a mode outside the prompt cover nothing.
    sub = gmm_metrics(prior, prior.sample(8, [3], seed=1), components=[0, 1], seed=2)
    assert sub["modes"] == 2 and sub["modes_covered"] == 0


def test_vsd_controls_of_fig14_and_apfo_defaults_in_2d():
    apfo = method_config(Image2DConfig(method="apfo"))
    assert apfo.schedule.kind == "decreasing" and apfo.schedule.views_per_t == 1
    assert (apfo.schedule.t_start, apfo.schedule.t_end) == (1.0, 0.0)
    vsd = method_config(Image2DConfig(method="vsd"))
    assert vsd.schedule.kind == "uniform"  # ProlificDreamer's 2D experiment does not anneal
    linear = method_config(Image2DConfig(method="vsd", t_schedule="linear"))
    assert linear.name == "vsd" and linear.schedule.kind == "decreasing" and linear.schedule.curve == "linear"
    dreamtime = method_config(Image2DConfig(method="vsd", t_schedule="dreamtime"))
    ts = [p.t for p in dreamtime.schedule.plan(100)]
    assert all(a > b for a, b in zip(ts, ts[1:])) and ts[0] == pytest.approx(1.0)
    # DreamTime spends its steps where its weight is: about half on DDPM steps 500..800 (a
    # linear plan: 30%), few below 300, where its weight falls off with width 100.
    assert sum(0.5 <= t <= 0.8 for t in ts) > 0.45 * len(ts) and sum(t < 0.3 for t in ts) < 0.05 * len(ts)
    assert float(dreamtime_weight(torch.tensor(650.0))) == 1.0
    assert float(dreamtime_weight(torch.tensor(400.0))) == pytest.approx(math.exp(-0.5))


class _NoNoise(NoiseSource):
    def sample(self, like, cameras, alpha, generator):
        return torch.zeros_like(like)


def test_apfo_last_step_lands_on_sigma_zero():
    """Stage 3's 0.3 -> 0.0 (and 2D's 1.0 -> 0.0): the last Euler step goes to sigma = 0, so the
    render moves the whole way to D_p - D_phi + x, not to the DDPM table's smallest level."""
    prior = GaussianMixturePrior.random((3, 4, 4), 2, std=0.05)
    plan = TimestepSchedule("decreasing", 0.3, 0.0, 10).plan(300)
    last = plan[-1]
    assert last.t_next == 0.0 and float(target_sigma(prior, last.t_next)) == 0.0
    assert float(target_sigma(prior, 0.1)) == pytest.approx(float(prior.sigma(0.1)))
    x = torch.rand(2, 3, 4, 4)
    cond = prior.condition("")
    ctx = TargetContext(prior, IdentityScoreModel(), cond, None, _NoNoise())
    result = ApfoTarget()(x, last, ctx)
    sigma = prior.sigma(last.t)
    assert torch.allclose(result.target, prior.denoise(x, sigma, cond), atol=1e-6)
    earlier = ApfoTarget()(x, StepInfo(0, last.t, 0.05, last.t), ctx)
    assert not torch.allclose(earlier.target, result.target)
