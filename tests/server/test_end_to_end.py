"""The real pipeline behind the real server: preset smoke, reference prior, over loopback."""

from __future__ import annotations


import pytest
from server_support import RunningServer, assert_glb_holds_the_final_mesh, collect

from dreamflow.export.mesh import MeshData
from dreamflow.server import Server
from dreamflow_protocol import Client


@pytest.mark.slow
def test_a_smoke_job_streams_progress_previews_meshes_and_a_fetchable_glb(tmp_path):
    srv = RunningServer(Server(tmp_path / "store", "tcp://127.0.0.1:*"))  # the default runner: pipeline.job.run_job
    try:
        with Client(srv.endpoint, timeout=10) as client:
            # Later stages are off to keep the suite's time; the protocol path is the same for every stage.
            job = client.submit("a small house", preset="smoke", seed=1, object_id="House",
                                overrides={"prior.kind": "reference", "stage1.steps": 3, "geometry.enabled": False,
                                           "texture.enabled": False, "refine.enabled": False})
            events = collect(client, job, timeout=240)
            assert events[-1].type == "job_done", events[-1].fields
            assert [m.seq for m in events] == list(range(len(events)))
            progress = [m for m in events if m.type == "progress"]
            assert progress and progress[-1].fields["step"] == progress[-1].fields["total"]
            assert any(m.type == "preview" and m.arrays["image"].ndim == 3 for m in events)
            meshes = [m for m in events if m.type == "mesh"]
            assert meshes[-1].fields["final"] and all(m.fields["object_id"] == "House" for m in meshes)
            MeshData.from_arrays(dict(meshes[-1].arrays)).validate()
            files = client.fetch(job, names=["model.glb"])
            assert_glb_holds_the_final_mesh(files["model.glb"].tobytes(), meshes[-1].arrays, tmp_path)
            assert client.status(job)["state"] == "done"
    finally:
        srv.stop()
