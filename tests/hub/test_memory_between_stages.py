"""Stage 3 runs with stages 1-2's diffusion models released: the pipeline's peak is the largest stage's.

The paper preset, in this process, from the offline cache: every diffusion model the pipeline loads
is watched through a weak reference; when the refiner is requested, SD 2.1-base (D_p), SD 2.1-v
(D_phi's base) and their LoRA adapters must already be gone.
"""

from __future__ import annotations

import gc
import weakref

import pytest
from offline_hub import SD21, SD21_BASE, SDXL_REFINER
from test_paper_preset_offline import TINY

from dreamflow.config import parse_cli_overrides
from dreamflow.events import JobControl, RecordingSink
from dreamflow.pipeline.config import build_config
from dreamflow.pipeline.job import run_job
from dreamflow.priors import loading


def _watch_loads(monkeypatch) -> list[tuple[str, str, weakref.ref, list[str]]]:
    """Record each load: (model, role, weak reference, models still alive when it was asked for)."""
    loads: list[tuple[str, str, weakref.ref, list[str]]] = []
    real = loading.load_diffusion_prior

    def watched(model, role, *args, **kwargs):
        gc.collect()
        alive = [m for m, _r, ref, _a in loads if ref() is not None]
        prior = real(model, role, *args, **kwargs)
        loads.append((model, role, weakref.ref(prior), alive))
        return prior

    monkeypatch.setattr(loading, "load_diffusion_prior", watched)
    return loads


@pytest.mark.slow
def test_the_refiner_loads_after_stages_1_and_2_models_are_freed(hub_env, tmp_path, monkeypatch):
    loads = _watch_loads(monkeypatch)
    cfg = build_config("paper", parse_cli_overrides(TINY), prompt="a red chair")
    run_job(cfg, tmp_path / "out", RecordingSink(), JobControl(), checkpoint_dir=tmp_path / "ckpt")
    assert [(m, r) for m, r, _ref, _a in loads] == [(SD21_BASE, "prior"), (SD21, "phi"), (SDXL_REFINER, "refiner")]
    assert loads[-1][3] == []  # nothing of stages 1-2 was alive when the refiner was loaded


@pytest.mark.slow
def test_a_refiner_that_is_the_prior_model_is_not_loaded_twice(hub_env, tmp_path, monkeypatch):
    loads = _watch_loads(monkeypatch)
    overrides = parse_cli_overrides(TINY + [f"prior.refiner_model={SD21_BASE}", "stage1.enabled=false",
                                            "geometry.enabled=false"])
    cfg = build_config("paper", overrides, prompt="a red chair")
    import numpy as np
    import trimesh

    from dreamflow.export.mesh import MeshData

    ico = trimesh.creation.icosphere(subdivisions=2, radius=0.3)
    mesh = MeshData(np.asarray(ico.vertices, np.float32), np.asarray(ico.faces, np.int32))
    run_job(cfg, tmp_path / "out", RecordingSink(), JobControl(), input_mesh=mesh, start_stage="texture")
    assert [(m, r) for m, r, _ref, _a in loads] == [(SD21_BASE, "prior"), (SD21, "phi")]
    gc.collect()
    assert loads[1][2]() is None  # D_phi's separate base went when stage 3 began
