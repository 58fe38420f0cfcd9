"""SIGKILL the server process in the middle of stage 1 of a real job, restart it on the same store.

The job is real: the pipeline's stage 1 on the reference prior, with checkpoints every 2 steps.
The same client follows the job across the crash; the restarted server resumes from the last
checkpoint (not from step 1), every event stored before the crash is still there with the same
id, the stream stays gap-free, and the job finishes with a GLB that loads.
"""

from __future__ import annotations

import os
import signal

import pytest
import torch
from reliability_helpers import TINY_REAL_JOB, collect, serve, stop
from server_support import assert_glb_holds_the_final_mesh

from dreamflow.server import JobStore
from dreamflow_protocol import Client

STEPS = 10


@pytest.mark.slow
def test_sigkill_mid_stage_resumes_from_the_last_checkpoint_and_loses_nothing(tmp_path):
    store = tmp_path / "store"
    proc, endpoint = serve(store, "--log-level", "warning")
    client = Client(endpoint, timeout=30, heartbeat=0.3)
    try:
        client.connect()
        job = client.submit("a small house", preset="smoke", seed=1, overrides=dict(TINY_REAL_JOB, **{"stage1.steps": STEPS}))
        before = collect(client, job, timeout=240, stop=lambda m: m.type == "progress" and m.fields["step"] >= 5)
        os.kill(proc.pid, signal.SIGKILL)  # no clean-up of any kind: a power cut or the OOM killer
        proc.wait(30)

        on_disk = JobStore(store).get(job)
        assert on_disk.state["state"] == "running"
        assert on_disk.next_seq >= len(before), "an event the client saw is missing from the store"
        checkpoint = torch.load(on_disk.checkpoint_dir / "stage1.pt", map_location="cpu", weights_only=False)
        saved_step = checkpoint["loop"]["iteration"]
        assert 2 <= saved_step < STEPS

        proc, _ = serve(store, "--log-level", "warning", bind=endpoint)  # same address: the client reconnects by itself
        after = collect(client, job, timeout=400)
        events = before + after
        assert [m.seq for m in events] == list(range(len(events))), "an event was lost or repeated across the crash"
        assert after[-1].type == "job_done", after[-1].fields
        resumed = next(i for i, m in enumerate(after) if m.type == "log" and "resuming" in m.fields["message"])
        first_step = next(m.fields["step"] for m in after[resumed:] if m.type == "progress")
        assert first_step == saved_step + 1 > 1, "the job did not resume from its last checkpoint"
        status = client.status(job)
        assert status["state"] == "done" and status["resumes"] == 1
        assert after[-1].fields["report"]["stages"]["stage1"]["steps"] == STEPS

        replay = Client(endpoint, timeout=30)
        with replay:
            replay.subscribe(job, from_seq=0)
            again = collect(replay, job, timeout=60)
        assert [m.id for m in again] == [m.id for m in events], "a stored event changed across the restart"
        glb = client.fetch(job, names=["model.glb"])["model.glb"]
        final = [m for m in again if m.type == "mesh" and m.fields.get("final")][-1]
        assert_glb_holds_the_final_mesh(glb.tobytes(), final.arrays, tmp_path)
    finally:
        client.close()
        err = stop(proc)
    assert proc.returncode == 0, err
