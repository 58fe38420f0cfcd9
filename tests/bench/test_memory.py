"""Out-of-memory fallbacks: checkpointed ray chunks give the same render and gradients, and an
iteration that runs out of memory is retried with the next saver instead of failing."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from dreamflow.memory import MemoryLadder, Saver, halving, install_oom_fallback, is_oom, once, retry_on_oom
from dreamflow.methods.loop import Distillation, LoopConfig
from dreamflow.methods.registry import build_method
from dreamflow.pipeline.config import build_config
from dreamflow.pipeline.memory_plan import (BYTES_PER_SAMPLE_PER_LEVEL, MIN_RAY_CHUNK, install_stage_fallback,
                                            plan_ray_chunk, ray_chunk_for_budget)
from dreamflow.pipeline.stage1 import NerfProblem, field_settings
from dreamflow.priors.base import Conditioning, IdentityScoreModel, Prior
from dreamflow.scene.cameras import CameraSampler
from dreamflow.scene.nerf import NerfField

CFG = replace(build_config("smoke").stage1, resolution=8, samples_per_ray=16)


def _problem(chunk, seed=0):
    field = NerfField(field_settings(CFG), "cpu", seed=seed)
    return NerfProblem(field, CFG, torch.device("cpu"), seed=seed, ray_chunk=chunk)


def _render_and_grads(chunk):
    problem = _problem(chunk)
    cams = CameraSampler(CFG.cameras, seed=0).sample(2)
    out = problem.render(cams)
    ((out.image ** 2).sum() + out.alpha.sum() + out.regulariser).backward()
    return out, [p.grad.clone() for p in problem.field.parameters()], problem.generator.get_state()


def test_checkpointed_chunks_give_the_same_render_gradients_and_generator_state():
    whole, g_whole, s_whole = _render_and_grads(None)
    chunked, g_chunked, s_chunked = _render_and_grads(30)  # 128 rays in 5 uneven chunks
    assert torch.allclose(whole.image, chunked.image, atol=1e-6)
    assert torch.allclose(whole.alpha, chunked.alpha, atol=1e-6)
    assert torch.allclose(whole.regulariser, chunked.regulariser, atol=1e-7, rtol=1e-4)
    for a, b in zip(g_whole, g_chunked):
        assert torch.allclose(a, b, atol=1e-6 * max(1.0, float(a.abs().max())), rtol=1e-4)
    # The recomputation replays the chunk's jitter and hands the generator back unchanged.
    assert torch.equal(s_whole, s_chunked)


class _HalfPrior(Prior):
    """A small analytic prior: the data is 0.5 everywhere (enough to drive the loop)."""

    def sigma(self, t):
        return torch.as_tensor(t, dtype=torch.float32) * 2.0 + 0.01

    def condition(self, prompt, negative_prompt="", guidance=7.5):
        return Conditioning(prompt, negative_prompt, guidance)

    def denoise(self, x_noisy, sigma, cond, cameras=None, guidance=None):
        return torch.full_like(x_noisy, 0.5)


class _LimitedField(torch.nn.Module):
    """A field that 'runs out of memory' when asked for more than ``limit`` points at once."""

    def __init__(self, inner, limit):
        super().__init__()
        self.inner, self.limit, self.largest = inner, limit, 0

    def forward(self, x):
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to evaluate {x.shape[0]} points")
        self.largest = max(self.largest, x.shape[0])
        return self.inner(x)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)


def test_an_iteration_that_runs_out_of_memory_is_retried_with_smaller_chunks():
    problem = _problem(None)
    real = problem.field
    # Whole image: 64 rays x 16 samples = 1024 points; allow at most 8 rays' worth at once.
    problem.field = _LimitedField(real, limit=8 * CFG.samples_per_ray)
    loop = Distillation(problem, build_method(CFG.method), _HalfPrior(), IdentityScoreModel(), Conditioning("x"),
                        CameraSampler(CFG.cameras, seed=0), LoopConfig(iterations=2))
    seen = []
    ladder = install_stage_fallback(loop, lambda what, why: seen.append((what, why)), first_ray_chunk=32,
                                    min_ray_chunk=4)
    before = [p.detach().clone() for p in real.parameters()]
    history = loop.run()
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(r.loss)) for r in history)
    # All rays, then 32 -> 16 -> 8 rays: three savers applied, each after an out-of-memory error.
    assert ladder.applied == ["halve-ray-chunk"] * 3 and problem.ray_chunk == 8
    assert [w for w, _ in seen] == ladder.applied and all("out of memory" in why for _, why in seen)
    assert 0 < problem.field.largest <= 8 * CFG.samples_per_ray
    assert any(not torch.equal(a, b) for a, b in zip(before, real.parameters()))  # it did optimise


def test_ladder_exhaustion_and_other_errors():
    calls = {"n": 0}

    def always_oom():
        calls["n"] += 1
        raise torch.OutOfMemoryError("CUDA out of memory")

    ladder = MemoryLadder([Saver("a", once(lambda: None)), Saver("b", once(lambda: None))])
    with pytest.raises(torch.OutOfMemoryError, match="even after every fallback \\(a, b\\)"):
        retry_on_oom(always_oom, ladder)
    assert calls["n"] == 3
    untouched = MemoryLadder([Saver("a", once(lambda: None))])
    with pytest.raises(ValueError):
        retry_on_oom(lambda: (_ for _ in ()).throw(ValueError("not memory")), untouched)
    assert untouched.applied == []


def test_oom_recognition_and_halving():
    assert is_oom(torch.OutOfMemoryError("x")) and is_oom(RuntimeError("CUDA error: out of memory"))
    assert not is_oom(RuntimeError("shape mismatch")) and not is_oom(ValueError("out of memory"))
    box = {"v": None}
    step = halving(lambda: box["v"], lambda v: box.__setitem__("v", v), start=64, minimum=16)
    assert [step() for _ in range(5)] == [True, True, True, False, False] and box["v"] == 16


def test_failed_step_leaves_no_gradients_behind():
    class Boom:
        def __init__(self):
            self.p = torch.nn.Parameter(torch.ones(3))
            self.optimiser = torch.optim.SGD([self.p], lr=0.1)
            self.tries = 0

        def step(self, info):
            self.tries += 1
            (self.p * 2).sum().backward()
            if self.tries == 1:
                raise torch.OutOfMemoryError("CUDA out of memory")
            return self.p.grad.clone()

    loop = Boom()
    install_oom_fallback(loop, MemoryLadder([Saver("s", once(lambda: None))]))
    assert torch.equal(loop.step(None), torch.full((3,), 2.0))  # not 4: the failed try's grads were dropped


def test_ray_chunk_plan():
    paper = build_config("paper").stage1
    rays, samples, levels = paper.resolution ** 2, paper.samples_per_ray, paper.grid.levels
    budget = 6 << 30  # a quarter of a 24 GB card
    chunk = plan_ray_chunk(rays, samples, levels, budget)
    assert chunk is not None and chunk & (chunk - 1) == 0 and MIN_RAY_CHUNK <= chunk < rays
    assert chunk * samples * levels * BYTES_PER_SAMPLE_PER_LEVEL <= budget
    assert plan_ray_chunk(64 * 64, 64, 8, budget) is None  # the preview render fits whole
    assert ray_chunk_for_budget(1, samples, levels) == MIN_RAY_CHUNK


def test_bytes_per_sample_covers_what_the_field_saves_for_backward():
    """The budget constant stays above the measured saved activations of the hash grid + MLP."""
    settings = field_settings(build_config("paper").stage1)
    settings = replace(settings, grid=replace(settings.grid, log2_table_size=14))  # table size is irrelevant
    field = NerfField(settings, "cpu")
    n = 4096
    x = torch.rand((n, 3)) - 0.5
    seen, total = set(), [0]

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total[0] += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        field(x)
    per_level = total[0] / n / settings.grid.levels
    assert 50 < per_level <= BYTES_PER_SAMPLE_PER_LEVEL
