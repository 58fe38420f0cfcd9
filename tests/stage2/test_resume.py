"""A mesh stage cancelled midway resumes from its checkpoint and ends exactly where an
uninterrupted run ends."""

import numpy as np
import pytest

from dreamflow.events import Cancelled, JobControl, RecordingSink
from dreamflow.export.mesh import MeshData
from dreamflow.pipeline.config import build_config
from dreamflow.pipeline.job import run_job
from dreamflow.scene.reference_object import builtin_house


class CancelAt(RecordingSink):
    """Records events and cancels the job after ``step`` progress events of ``stage``."""

    def __init__(self, control: JobControl, stage: str, step: int):
        super().__init__()
        self.control, self.stage, self.step = control, stage, step

    def emit(self, kind, fields, arrays=None):
        super().emit(kind, fields, arrays)
        if kind == "progress" and fields["stage"] == self.stage and fields["step"] == self.step:
            self.control.cancel("test")


def test_texture_stage_resumes_bit_for_bit(tmp_path):
    house = builtin_house()
    grey = MeshData(house.vertices.copy(), house.faces.copy(), None, house.uvs.copy(),
                    np.full_like(house.texture, 100))
    cfg = build_config("smoke", overrides={"texture.steps": 6, "checkpoint_every": 2, "refine.enabled": False})
    plain = RecordingSink()
    run_job(cfg, tmp_path / "a", plain, JobControl(), input_mesh=grey, start_stage="texture",
            checkpoint_dir=tmp_path / "ck_a")
    control = JobControl()
    with pytest.raises(Cancelled):
        run_job(cfg, tmp_path / "b", CancelAt(control, "texture", 4), control, input_mesh=grey,
                start_stage="texture", checkpoint_dir=tmp_path / "ck_b")
    resumed = RecordingSink()
    run_job(cfg, tmp_path / "b", resumed, JobControl(), input_mesh=grey, start_stage="texture",
            checkpoint_dir=tmp_path / "ck_b")
    steps = [e[1]["step"] for e in resumed.of_kind("progress")]
    assert steps == [5, 6]
    final = [e[2] for e in plain.of_kind("mesh") if e[1]["final"]][-1]
    again = [e[2] for e in resumed.of_kind("mesh") if e[1]["final"]][-1]
    assert np.array_equal(final["texture"], again["texture"])
