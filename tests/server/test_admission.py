"""What a server accepts from a client's job spec: paths, ranges, the operator's caps; errors by name (issue 17: 1, 4, 9)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from server_runners import StepRunner

from dreamflow.config import ConfigError
from dreamflow.pipeline.config import PRESETS, JobConfig, build_config
from dreamflow_protocol import RequestError

REPO = Path(__file__).resolve().parents[2]


def _refusal(client, **overrides) -> RequestError:
    with pytest.raises(RequestError) as info:
        client.submit("x", preset="smoke", overrides=overrides, subscribe=False)
    return info.value


def test_a_client_names_only_model_ids_and_paths_under_allowed_folders(make_server, make_client, tmp_path):
    allowed = tmp_path / "models"
    (allowed / "sd").mkdir(parents=True)
    (allowed / "house.ply").write_bytes(b"ply\n")
    outside = tmp_path / "private"
    outside.mkdir()
    (outside / "secret.ply").write_bytes(b"ply\n")
    (allowed / "escape.ply").symlink_to(outside / "secret.ply")  # a link inside an allowed folder may not lead out
    runner = StepRunner(steps=1)
    srv = make_server(runner, models_dirs=[allowed])
    client = make_client(srv.endpoint)
    texts = {}
    for key, value in [("prior.reference", str(outside / "secret.ply")), ("prior.reference", str(outside / "missing.ply")),
                       ("prior.model", "/usr"), ("prior.model", "/no/such/folder"), ("prior.phi_model", "/etc"),
                       ("prior.refiner_model", "../../etc"), ("prior.reference", "house.ply"),
                       ("prior.reference", str(allowed / "escape.ply"))]:
        err = _refusal(client, **{key: value})
        assert err.code == "bad_request" and key in str(err) and "--models-dir" in str(err)
        texts[(key, value)] = str(err).replace(repr(value), "VALUE")
    # The same words whether the path exists on the server or not: nothing about its files leaks.
    assert texts[("prior.reference", str(outside / "secret.ply"))] == texts[("prior.reference", str(outside / "missing.ply"))]
    assert texts[("prior.model", "/usr")] == texts[("prior.model", "/no/such/folder")]
    assert runner.calls == [] and srv.server.store.all() == []  # refused before anything was stored or loaded
    for key, value in [("prior.reference", str(allowed / "house.ply")), ("prior.reference", "builtin"),
                       ("prior.model", str(allowed / "sd")), ("prior.model", "stabilityai/stable-diffusion-2-1-base")]:
        client.submit("x", preset="smoke", overrides={key: value}, subscribe=False)


@pytest.mark.parametrize("key, value, words", [
    ("stage1.steps", 10**12, "stage1.steps = 1000000000000 is outside its valid range [1, 100000]"),
    ("stage1.steps", 0, "stage1.steps = 0 is outside its valid range [1, 100000]"),
    ("stage1.steps", -5, "stage1.steps = -5 is outside its valid range [1, 100000]"),
    ("stage1.resolution", -1, "stage1.resolution = -1 is outside its valid range [16, 4096]"),
    ("stage1.samples_per_ray", 10**9, "stage1.samples_per_ray = 1000000000 is outside its valid range [1, 4096]"),
    ("export.texture_size", -1, "export.texture_size = -1 is outside its valid range [16, 8192]"),
])
def test_out_of_range_settings_are_refused_at_submit_naming_the_setting_and_its_range(make_server, make_client, key, value,
                                                                                     words):
    srv = make_server()
    err = _refusal(make_client(srv.endpoint), **{key: value})
    assert err.code == "bad_request" and words in str(err)
    assert srv.server.store.all() == []


def test_the_operator_caps_steps_and_resolution(make_server, make_client):
    srv = make_server(max_steps=50, max_resolution=64)
    client = make_client(srv.endpoint)
    assert "stage1.steps = 51 is over this server's limit of 50" in str(_refusal(client, **{"stage1.steps": 51}))
    assert "export.texture_size = 128 is over this server's limit of 64" in str(_refusal(client, **{"export.texture_size": 128}))
    assert client.capabilities["limits"]["max_steps"] == 50
    client.submit("x", preset="smoke", subscribe=False)  # the smoke preset fits both caps


def test_every_numeric_setting_declares_a_range_and_every_preset_lies_inside():
    from dreamflow.config import check_ranges, unranged_numbers

    assert unranged_numbers(JobConfig()) == []
    for preset in PRESETS:
        for method in ("apfo", "vsd", "sds", "fsd"):
            check_ranges(build_config(preset, method=method))
    with pytest.raises(ConfigError, match=r"stage1.cameras.fovy_deg = 0.0 is outside its valid range \[1, 179\]"):
        build_config("smoke", {"stage1.cameras.fovy_deg": "0,60"})


def test_the_addon_panel_limits_are_the_backend_ranges_and_its_spec_passes_at_both_ends():
    from dreamflow.config import numeric_settings

    sys.path.insert(0, str(REPO / "blender_addon"))
    try:
        import jobspec
    finally:
        sys.path.remove(str(REPO / "blender_addon"))
    ranges = {name.split(".")[-1]: rng for name, rng, _ in numeric_settings(JobConfig().stage1)}
    ranges.update({name.split(".")[-1]: rng for name, rng, _ in numeric_settings(JobConfig().stage1.method.schedule)})
    for prop, (lo, hi) in jobspec.STAGE_LIMITS.items():
        assert (lo, hi) == (ranges[prop].lo, ranges[prop].hi), prop
    for end in (0, 1):
        stages = {name: jobspec.StageSettings(customize=True, **{p: jobspec.STAGE_LIMITS[p][end] for p in
                                                              ("resolution", "views_per_t", "steps")},
                                              t_start=1.0, t_end=0.0) for name in jobspec.STAGES}
        args = jobspec.submit_arguments("x", "", 0, "apfo", "smoke", stages)
        build_config(args["preset"], args["overrides"])


def test_a_well_formed_unknown_job_id_is_unknown_job(make_server, make_client):
    client = make_client(make_server().endpoint)
    for job in ("ab" * 16, "0123abcd" * 2, "f" * 64):
        with pytest.raises(RequestError) as info:
            client.status(job)
        assert info.value.code == "unknown_job", job


def test_protocol_md_lists_every_error_code_the_code_sends():
    text = (REPO / "shared/dreamflow_protocol/PROTOCOL.md").read_text()
    listed = set(re.findall(r"[a-z_]+", re.search(r"Error codes: (.*?)\n\n", text, re.S).group(1)))
    sources = "".join(p.read_text() for p in [*(REPO / "backend/dreamflow/server").glob("*.py"),
                                               *(REPO / "shared/dreamflow_protocol").glob("*.py")])
    used = set(re.findall(r'code(?:=|": )"([a-z_]+)"', sources)) | {"bad_message"}
    assert used <= listed, used - listed


def test_the_cli_says_a_remote_server_needs_keys_when_nobody_answers(tmp_path):
    out = subprocess.run([sys.executable, "-m", "dreamflow", "status", "--connect", "tcp://192.0.2.1:5555", "--timeout", "0.3"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "needs CURVE keys: pass --keys DIR" in out.stderr
    out = subprocess.run([sys.executable, "-m", "dreamflow", "status", "--connect", "tcp://127.0.0.1:9", "--timeout", "0.3"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "started with --keys, pass --keys DIR too" in out.stderr


def test_the_cli_set_is_checked_against_the_ranges(tmp_path):
    out = subprocess.run([sys.executable, "-m", "dreamflow", "generate", "a chair", "--preset", "smoke", "--out",
                          str(tmp_path / "o"), "--set", "stage1.samples_per_ray=1000000000"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "stage1.samples_per_ray = 1000000000 is outside its valid range [1, 4096]" in out.stderr
