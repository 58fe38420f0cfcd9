"""A view that sees none of the object carries no gradient; the loop must step past it."""

import torch

from dreamflow.methods.loop import Distillation, LoopConfig, Problem, Rendered
from dreamflow.methods.registry import MethodConfig, build_method
from dreamflow.methods.schedules import TimestepSchedule
from dreamflow.priors.base import IdentityScoreModel
from dreamflow.priors.gmm import GaussianMixturePrior


class SometimesBlind(Problem):
    """One particle; every other render is pure background (no dependence on the parameters)."""

    def __init__(self) -> None:
        self.x = torch.nn.Parameter(torch.zeros(1, 3, 4, 4))
        self.calls = 0

    def param_groups(self):
        return [{"params": [self.x], "lr": 0.05}]

    def render(self, cameras):
        self.calls += 1
        if self.calls % 2 == 0:
            return Rendered(torch.full((1, 3, 4, 4), 0.5))
        return Rendered(self.x)

    def state_dict(self):
        return {"x": self.x.detach().clone()}

    def load_state_dict(self, state):
        with torch.no_grad():
            self.x.copy_(state["x"])


def test_blind_views_are_stepped_past_and_seeing_views_still_train():
    prior = GaussianMixturePrior.random(shape=(3, 4, 4), modes=2, std=0.05, seed=0)
    cond = prior.condition("", guidance=1.0)
    method = build_method(MethodConfig(schedule=TimestepSchedule("decreasing", 0.8, 0.2, 1), score_model="identity"))
    problem = SometimesBlind()
    loop = Distillation(problem, method, prior, IdentityScoreModel(), cond, None, LoopConfig(iterations=10))
    after = [problem.x.detach().clone()]
    history = loop.run(lambda report: after.append(problem.x.detach().clone()))
    assert len(history) == 10 and loop.state.rollbacks == 0
    # Step i renders call i + 1: odd steps are blind. A blind step leaves the particle exactly where
    # it was (no stale gradient, no momentum step); every seeing step moves it.
    for i in range(10):
        moved = not torch.equal(after[i + 1], after[i])
        assert moved == (i % 2 == 0), (i, moved)
