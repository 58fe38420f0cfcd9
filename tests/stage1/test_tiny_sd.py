"""Stage 1 end to end with the tiny random Stable Diffusion: latents, VAE-encoder gradients, LoRA D_phi."""

import pytest
import torch

from dreamflow.events import JobControl, RecordingSink
from dreamflow.pipeline.config import build_config
from dreamflow.pipeline.context import JobContext
from dreamflow.pipeline.stage1 import field_settings, run_stage1
from dreamflow.scene.nerf import NerfField


@pytest.fixture
def one_thread():
    """Tiny models: one intra-op thread is faster and leaves the other core free."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_a_few_stage1_steps_with_tiny_stable_diffusion(tmp_path, one_thread):
    cfg = build_config("smoke", {"prior.kind": "tiny", "stage1.method.score_model": "lora", "stage1.steps": 3,
                                 "stage1.mesh_every": 0, "stage1.preview_every": 0, "stage1.mesh_resolution": 24,
                                 "stage1.method.guidance": 7.5},
                       prompt="a small toy house")
    sink = RecordingSink()
    ctx = JobContext(cfg, tmp_path, sink, JobControl(), torch.device("cpu"), checkpoint_dir=tmp_path / "ckpt",
                     stage_names=["stage1"])
    result = run_stage1(ctx)
    prior = ctx.cache["prior"]
    assert prior.is_latent and prior.vae is not None
    done = sink.of_kind("stage_done")[-1][1]
    assert done["report"]["score_model"] == "lora"
    losses = [f["loss"] for _, f, _ in sink.of_kind("progress")]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    # The only path from the loss to the NeRF runs through the VAE encoder: if the field moved,
    # gradients crossed it.
    fresh = NerfField(field_settings(cfg.stage1), seed=cfg.seed)
    with torch.no_grad():
        assert all(torch.isfinite(p).all() for p in result.field.parameters())
        moved = [float((a - b).abs().max()) for a, b in zip(result.field.grid_parameters(), fresh.grid_parameters())]
    assert max(moved) > 0
    # The LoRA adapter of D_phi trained on the renders.
    lora = [p for n, p in prior.unet.named_parameters() if "dreamflow_phi_stage1" in n and "lora_B" in n]
    assert lora and max(float(p.abs().max()) for p in lora) > 0
    assert result.mesh.texture is not None and result.mesh.uvs is not None
