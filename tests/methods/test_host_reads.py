"""An iteration reads nothing back from the device until its backward is queued.

On a GPU every read of a device value (``float(t)``, ``t.item()``, ``bool(t)``, ``t.tolist()``)
makes Python wait for the queue to drain, and the kernels after it are launched onto an idle GPU.
The loop reads its logged values once, when the backward pass has reached the render (it needs
them to decide whether to step). CPU tensors go through the same dispatcher, so the order of
reads is visible here without a GPU: the tiny Stable Diffusion prior, its LoRA D_phi with the
update, view-dependent prompts and the VAE all take part.
"""

import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dreamflow.methods.loop import Distillation, LoopConfig
from dreamflow.methods.registry import MethodConfig, build_method
from dreamflow.methods.schedules import TimestepSchedule
from dreamflow.pipeline.image2d import ParticleProblem
from dreamflow.priors.score_models import LoraScoreModel
from dreamflow.priors.stable_diffusion import StableDiffusionPrior
from dreamflow.priors.tiny import tiny_stable_diffusion
from dreamflow.scene.cameras import CameraSampler


#: Reads of tensors that stay on the host in a GPU run too: values checked to be host tensors
#: (``devices.host_value`` raises otherwise), the timestep schedule's noise-level tables, and the
#: optimisers' step counters (PyTorch keeps them on the CPU unless ``capturable``/``fused``).
HOST_SIDE = (("devices.py", "host_value"), ("devices.py", "host_list"), ("noise_levels.py", None),
             ("optimizer.py", "_get_value"))


def _host_side() -> bool:
    for frame in traceback.extract_stack():
        name = Path(frame.filename).name
        if any(name == f and (fn is None or frame.name == fn) for f, fn in HOST_SIDE):
            return True
    return False


class ReadRecorder(TorchDispatchMode):
    """Notes every scalar read of a (would-be) device value, in order with the test's markers."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and not _host_side():
            self.events.append("read " + _where())
        return func(*args, **(kwargs or {}))


def _where() -> str:
    return " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in traceback.extract_stack()[-8:-2])


def test_one_step_reads_the_device_only_once_its_backward_reached_the_render(tmp_path, monkeypatch):
    prior = StableDiffusionPrior.from_pretrained(str(tiny_stable_diffusion(tmp_path / "sd")), local_files_only=True)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    problem = ParticleProblem(image, lr=1e-2)
    method = build_method(MethodConfig(schedule=TimestepSchedule("decreasing", 0.9, 0.2, 1), score_model="lora"))
    loop = Distillation(problem, method, prior, LoraScoreModel(prior, rank=4), prior.condition("a chair"),
                        CameraSampler(seed=0), LoopConfig(iterations=4))
    recorder = ReadRecorder()
    # tolist() reads without going through the dispatcher: watch it directly.
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist",
                        lambda t: (None if _host_side() else recorder.events.append("read (tolist) " + _where()), tolist(t))[1])
    render = problem.render

    def marked_render(cameras):
        out = render(cameras)
        out.image.register_hook(lambda grad: recorder.events.append("backward reached the render"))
        return out

    problem.render = marked_render
    with recorder:
        report = loop.step(loop.plan[0])
    assert "backward reached the render" in recorder.events
    before = recorder.events[:recorder.events.index("backward reached the render")]
    assert not [e for e in before if e.startswith("read")], before
    after = [e for e in recorder.events[len(before):] if e.startswith("read")]
    assert len(after) == 1 and "loop.py" in after[0], after  # the one read, in the loop
    # The logged values still arrive as numbers.
    assert all(isinstance(v, float) for v in (report.loss, report.grad_norm, report.score_loss, report.sigma))
    assert report.score_loss > 0 and report.loss > 0



def test_view_prompts_of_cameras_on_a_device_read_the_host_copy(tmp_path):
    """View-dependent prompts read the camera angles: from the sampler's CPU draws, not from the
    device (the meta device stands in for an accelerator: its values cannot be read at all)."""
    prior = StableDiffusionPrior.from_pretrained(str(tiny_stable_diffusion(tmp_path / "sd")), local_files_only=True)
    cams = CameraSampler(seed=3).sample(6)
    on_device = cams.to("meta")
    assert on_device.device.type == "meta" and on_device.host() is cams
    assert torch.equal(prior.prompt_index(6, on_device), prior.prompt_index(6, cams))
