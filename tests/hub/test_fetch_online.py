"""`dreamflow models fetch` online, against a fake Hugging Face Hub on loopback (tests/hub/fake_hub.py).

The fetch runs as a real process with ``HF_ENDPOINT`` at the fake Hub, an empty ``HF_HOME`` and the
network allowed (the suite's ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` removed), through the real
huggingface_hub. The Hub serves the paper preset's repositories as the real ones are laid out: tiny
random weights under the real ids, with fp16 variants, ``.bin`` duplicates, ``.ckpt`` / single-file
checkpoints and a feature extractor beside the files the pipeline reads. As on the real Hub, SD 2.1's
original stabilityai repositories are deleted and sd2-community's mirrors hold their files. The
server's request log is the evidence of what was downloaded.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from fake_hub import FakeHub, Fault
from offline_hub import (MIRROR_OF, PAPER_MODELS, REMOVED_SD21, REMOVED_SD21_BASE, SD21, SD21_BASE, SDXL_REFINER,
                         build_model_folder, commit_of)

GATED = "org/gated-model"
UNET = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def repo_folders(tmp_path_factory) -> dict[str, Path]:
    """The paper models' repositories as folders (built once: the tiny weights take a while on 2 cores)."""
    root = tmp_path_factory.mktemp("repos")
    folders = {}
    for model in PAPER_MODELS:
        folders[model] = root / model.replace("/", "--")
        build_model_folder(model, folders[model])
    return folders


def _start_hub(repo_folders: dict[str, Path]) -> FakeHub:
    hub = FakeHub()
    for model, folder in repo_folders.items():
        hub.add_folder(model, folder, commit_of(model))
    hub.add_folder(GATED, repo_folders[SD21_BASE], commit_of(GATED), gated=True)
    hub.removed |= set(MIRROR_OF)  # Stability AI's SD 2.1 repositories, deleted
    hub.start()
    return hub


@pytest.fixture
def hub(repo_folders):
    """A fresh fake Hub (empty request log, no faults) for one test."""
    server = _start_hub(repo_folders)
    yield server
    server.stop()


def _env(home: Path, hub: FakeHub) -> dict[str, str]:
    env = dict(os.environ, HF_HOME=str(home), HF_ENDPOINT=hub.url, PYTHONUNBUFFERED="1")
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HF_TOKEN", "HF_TOKEN_PATH"):
        env.pop(name, None)
    return env


def _models(action: str, home: Path, hub: FakeHub, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dreamflow", "models", action, "--preset", "paper", *args],
                          capture_output=True, text=True, env=_env(home, hub))


def _read_by_float32(folder: Path, parts: tuple[str, ...]) -> set[str]:
    """What a float32 job reads of a repository, written out by hand (not computed by the code under test)."""
    weights = {"unet": UNET, "vae": "vae/diffusion_pytorch_model.safetensors",
               "text_encoder": "text_encoder/model.safetensors", "text_encoder_2": "text_encoder_2/model.safetensors"}
    files = {"model_index.json", "scheduler/scheduler_config.json"}
    for part in parts:
        if part.startswith("tokenizer"):
            files |= {p.relative_to(folder).as_posix() for p in (folder / part).iterdir()}
        else:
            files |= {f"{part}/config.json", weights[part]}
    return files


def _expected_float32(repo_folders: dict[str, Path]) -> dict[str, set[str]]:
    return {
        SD21_BASE: _read_by_float32(repo_folders[SD21_BASE], ("unet", "vae", "text_encoder", "tokenizer")),
        SD21: _read_by_float32(repo_folders[SD21], ("unet", "text_encoder", "tokenizer")),  # D_phi: no VAE
        SDXL_REFINER: _read_by_float32(repo_folders[SDXL_REFINER],
                                       ("unet", "vae", "text_encoder_2", "tokenizer_2")),
    }


def _gets_by_repo(hub: FakeHub, requests=None) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for repo, name in hub.file_gets(requests):
        out.setdefault(repo, []).append(name)
    return out


def _snapshot(home: Path, model: str) -> Path:
    return home / "hub" / ("models--" + model.replace("/", "--")) / "snapshots" / commit_of(model)


def _ready_rows(stdout: str) -> list[tuple[str, str, str]]:
    rows = [line.split() for line in stdout.splitlines() if line.startswith(("prior", "phi", "refiner"))]
    return [(r[0], r[1], next(w for w in r[2:] if w in ("ready", "missing"))) for r in rows]


def _assert_nothing_half_written(home: Path, repo_folders: dict[str, Path]) -> None:
    """Every file in a snapshot is whole (its bytes are the Hub's), and no partial download is left behind."""
    for model, folder in repo_folders.items():
        snapshot = _snapshot(home, model)
        for path in (p for p in snapshot.rglob("*") if not p.is_dir()):
            rel = path.relative_to(snapshot).as_posix()
            assert path.is_file() and path.read_bytes() == (folder / rel).read_bytes(), f"{model}: {rel}"
    assert not list((home / "hub").rglob("*.incomplete"))


# -- 1 and 5: the paper preset downloads what it reads, nothing else, and only once --------------
@pytest.fixture(scope="module")
def fetched(repo_folders, tmp_path_factory):
    """One `models fetch --preset paper --device cpu` into an empty HF_HOME: (home, hub, result, requests)."""
    server = _start_hub(repo_folders)
    home = tmp_path_factory.mktemp("hf-home-cpu")
    done = _models("fetch", home, server, "--device", "cpu")
    yield home, server, done, server.take_requests()
    server.stop()


def test_fetch_downloads_exactly_the_files_a_float32_job_reads(fetched, repo_folders):
    home, hub, done, requests = fetched
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "fetching 3 of 3 models" in done.stderr
    gets = _gets_by_repo(hub, requests)
    assert {repo: set(names) for repo, names in gets.items()} == _expected_float32(repo_folders)
    assert not [r.path for r in requests if "stabilityai/stable-diffusion-2-1" in r.path]  # the removed ids
    for repo, names in gets.items():
        assert len(names) == len(set(names)), f"{repo}: a file was downloaded twice: {names}"
        assert not [n for n in names if n.endswith((".ckpt", ".bin")) or ".fp16." in n or "/" not in n
                    and n != "model_index.json" or n.startswith(("feature_extractor/", "safety_checker/"))]
    _assert_nothing_half_written(home, repo_folders)


def test_after_the_fetch_list_says_ready_and_the_priors_load_offline_from_the_fresh_cache(fetched, monkeypatch):
    home, hub, _done, _requests = fetched
    listed = _models("list", home, hub, "--device", "cpu")
    assert listed.returncode == 0, listed.stdout + listed.stderr[-2000:]
    assert _ready_rows(listed.stdout) == [("prior", SD21_BASE, "ready"), ("phi", SD21, "ready"),
                                          ("refiner", SDXL_REFINER, "ready")]
    assert hub.take_requests() == []  # list never touches the network

    from dreamflow.priors.loading import load_diffusion_prior
    from dreamflow.priors.sdxl_refiner import SdxlRefinerPrior

    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    prior = load_diffusion_prior(SD21_BASE, "prior", dtype="float32")
    assert prior.prediction_type == "epsilon" and prior.vae is not None
    phi = load_diffusion_prior(SD21, "phi", dtype="float32")
    assert phi.prediction_type == "v_prediction" and phi.vae is None
    refiner = load_diffusion_prior(SDXL_REFINER, "refiner", dtype="float32")
    assert isinstance(refiner, SdxlRefinerPrior) and refiner.conditioner.requires_aesthetics_score


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_a_second_fetch_with_everything_present_sends_no_request(fetched, device):
    # For cuda too: half precision reads a part's fp16 variant where it is on disk, else casts the
    # plain weights, so with the plain ones present the model is complete for a GPU job as well.
    home, hub, _done, _requests = fetched
    hub.take_requests()
    again = _models("fetch", home, hub, "--device", device)
    assert again.returncode == 0, again.stdout + again.stderr[-2000:]
    assert "nothing to download" in again.stdout
    assert hub.take_requests() == []


# -- 1b: the ids Stability AI removed ----------------------------------------------------------
def _requests_for(requests, *models: str) -> list[str]:
    return [f"{r.method} {r.path}" for r in requests if any(f"/{m}/" in r.path + "/" for m in models)]


def test_naming_a_removed_id_fetches_its_mirror_and_says_so_in_one_line(hub, repo_folders, tmp_path):
    home = tmp_path / "hf-home"
    done = _models("fetch", home, hub, "--device", "cpu", "--set", f"prior.model={REMOVED_SD21_BASE}",
                   "--set", f"prior.phi_model={REMOVED_SD21}")
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    requests = hub.take_requests()
    assert _requests_for(requests, REMOVED_SD21_BASE, REMOVED_SD21) == []  # never asked for: known to be gone
    assert {repo: set(names) for repo, names in _gets_by_repo(hub, requests).items()} == _expected_float32(repo_folders)
    told = [line for line in done.stderr.splitlines() if "removed from the Hugging Face Hub" in line]
    assert told == [f"{REMOVED_SD21_BASE} was removed from the Hugging Face Hub: downloading the same files from "
                    f"{SD21_BASE} instead (set prior.model to use another model)",
                    f"{REMOVED_SD21} was removed from the Hugging Face Hub: downloading the same files from "
                    f"{SD21} instead (set prior.phi_model to use another model)"]
    assert f"prior: {REMOVED_SD21_BASE} -> present as {SD21_BASE}" in done.stdout
    _assert_nothing_half_written(home, repo_folders)


@pytest.mark.parametrize("named", ["defaults", "old ids"])
def test_a_cache_filled_before_the_removal_is_used_without_a_request(named, hub, repo_folders, tmp_path):
    home = tmp_path / "hf-home"
    from offline_hub import add_to_cache

    for model in (REMOVED_SD21_BASE, REMOVED_SD21, SDXL_REFINER):
        add_to_cache(home / "hub", model, repo_folders[MIRROR_OF.get(model, model)])
    old_ids = ["--set", f"prior.model={REMOVED_SD21_BASE}", "--set", f"prior.phi_model={REMOVED_SD21}"]
    done = _models("fetch", home, hub, "--device", "cpu", *(old_ids if named == "old ids" else []))
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "nothing to download" in done.stdout
    assert hub.take_requests() == []
    assert not (home / "hub" / ("models--" + SD21_BASE.replace("/", "--"))).exists()


def test_a_deleted_repository_without_a_known_mirror_is_one_line(hub, tmp_path):
    hub.removed.add("stabilityai/stable-diffusion-2-base")  # also deleted, and not in the renames table
    done = _models("fetch", tmp_path / "hf-home", hub, "--device", "cpu",
                   "--set", "prior.model=stabilityai/stable-diffusion-2-base", "--set", "refine.enabled=false")
    assert done.returncode == 1
    problem = _one_problem_line(done, "prior")
    assert "'stabilityai/stable-diffusion-2-base'" in problem and "is not on the Hugging Face Hub" in problem
    assert not [g for g in hub.file_gets() if g[0] == "stabilityai/stable-diffusion-2-base"]


def test_a_pinned_revision_is_fetched_and_a_missing_one_is_one_line(hub, repo_folders, tmp_path):
    home = tmp_path / "hf-home"
    pinned = commit_of(SD21_BASE)
    done = _models("fetch", home, hub, "--device", "cpu", "--set", f"prior.model_revision={pinned}",
                   "--set", "prior.phi_model_revision=v2", "--set", "refine.enabled=false")
    assert done.returncode == 1
    requests = hub.take_requests()
    resolved = {r.path.split("/resolve/")[1].split("/")[0] for r in requests if r.file() and r.file()[0] == SD21_BASE}
    assert resolved == {pinned}  # every file of prior.model was asked for at the pinned commit
    assert (_snapshot(home, SD21_BASE) / UNET).is_file()
    problem = _one_problem_line(done, "phi")
    assert f"model '{SD21}'" in problem and "has no revision 'v2'" in problem
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith(("prior", "phi"))]
    assert [(r[0], r[2]) for r in rows] == [("prior", pinned), ("phi", "v2")]


# -- 2: planning a GPU job's download from this CPU machine -------------------------------------
def test_fetch_for_a_cuda_job_downloads_the_fp16_variants(hub, repo_folders, tmp_path):
    done = _models("fetch", tmp_path / "hf-home", hub, "--device", "cuda")
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    expected = {repo: {n.replace(".safetensors", ".fp16.safetensors") if n.endswith("model.safetensors") else n
                       for n in names} for repo, names in _expected_float32(repo_folders).items()}
    assert {repo: set(names) for repo, names in _gets_by_repo(hub, hub.take_requests()).items()} == expected
    # The same cache for a CPU job: only the plain weights are fetched, nothing else again.
    done = _models("fetch", tmp_path / "hf-home", hub, "--device", "cpu")
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    plain = {repo: {n for n in names if n.endswith("model.safetensors")}
             for repo, names in _expected_float32(repo_folders).items()}
    assert {repo: set(names) for repo, names in _gets_by_repo(hub, hub.take_requests()).items()} == plain
    _assert_nothing_half_written(tmp_path / "hf-home", repo_folders)


# -- 3: a connection cut in the middle of the UNet's weights ------------------------------------
def _padded(weights: bytes, size: int) -> bytes:
    """The same tensors in a safetensors file of at least ``size`` bytes (padding in its metadata)."""
    from safetensors.torch import load, save

    return save(load(weights), metadata={"format": "pt", "padding": " " * size})


def test_a_cut_connection_is_resumed_with_a_range_request_from_where_it_stopped(hub, repo_folders, tmp_path):
    from huggingface_hub.constants import DOWNLOAD_CHUNK_SIZE

    # huggingface_hub writes what it receives in chunks of DOWNLOAD_CHUNK_SIZE (10 MiB), so a resume
    # continues from the last whole chunk: the UNet must be larger than one chunk, as real ones are.
    unet = _padded((repo_folders[SD21_BASE] / UNET).read_bytes(), DOWNLOAD_CHUNK_SIZE + 1_000_000)
    hub.repos[SD21_BASE].files[UNET] = unet
    cut = DOWNLOAD_CHUNK_SIZE + 500_000
    hub.faults[(SD21_BASE, UNET)] = Fault(cut_at=cut)
    home = tmp_path / "hf-home"
    done = _models("fetch", home, hub, "--device", "cpu")
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    unet_gets = [r for r in hub.requests if r.method == "GET" and r.file() == (SD21_BASE, UNET)]
    assert [r.headers.get("Range") for r in unet_gets] == [None, f"bytes={DOWNLOAD_CHUNK_SIZE}-"]
    assert (_snapshot(home, SD21_BASE) / UNET).read_bytes() == unet


def _one_problem_line(done: subprocess.CompletedProcess, role: str) -> str:
    lines = [line.strip() for line in done.stdout.splitlines() if line.startswith(f"  {role}: ")]
    assert len(lines) == 1, done.stdout + done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("then", ["outage", "drops"])
def test_a_cut_that_cannot_be_resumed_fails_in_one_line_and_the_next_fetch_completes(then, hub, repo_folders,
                                                                                       tmp_path):
    # After the cut the Hub either answers 503 or keeps dropping the connection (huggingface_hub then
    # retries five times, a second apart, before giving up).
    hub.faults[(SD21_BASE, UNET)] = Fault(cut_at=300_000, outage=503 if then == "outage" else None,
                                          drop_again=then == "drops")
    home = tmp_path / "hf-home"
    failed = _models("fetch", home, hub, "--device", "cpu")
    assert failed.returncode == 1
    problem = _one_problem_line(failed, "prior")
    assert f"model '{SD21_BASE}'" in problem and "could not be downloaded" in problem
    assert not (_snapshot(home, SD21_BASE) / UNET).exists()
    _assert_nothing_half_written(home, repo_folders)
    assert _ready_rows(failed.stdout) == [("prior", SD21_BASE, "missing"), ("phi", SD21, "ready"),
                                          ("refiner", SDXL_REFINER, "ready")]

    hub.faults.clear()
    hub.take_requests()
    again = _models("fetch", home, hub, "--device", "cpu")
    assert again.returncode == 0, again.stdout + again.stderr[-3000:]
    assert "fetching 1 of 3 models" in again.stderr
    # Only what was missing is downloaded again; huggingface_hub 2.4 keeps no partial file between
    # runs (its temporary file is per process and deleted on failure), so the UNet starts over.
    assert hub.file_gets() == [(SD21_BASE, UNET)]
    assert [r.headers.get("Range") for r in hub.requests if r.method == "GET" and r.file()] == [None]
    _assert_nothing_half_written(home, repo_folders)


# -- 4: a model the Hub does not have, and a gated one ------------------------------------------
def test_a_missing_and_a_gated_model_each_give_one_line(hub, tmp_path):
    done = _models("fetch", tmp_path / "hf-home", hub, "--device", "cpu", "--set", "prior.model=org/no-such-model",
                   "--set", f"prior.phi_model={GATED}", "--set", "refine.enabled=false")
    assert done.returncode == 1
    missing = _one_problem_line(done, "prior")
    assert "'org/no-such-model'" in missing and "is not on the Hugging Face Hub" in missing and "check the id" in missing
    gated = _one_problem_line(done, "phi")
    assert f"'{GATED}'" in gated and "is gated" in gated and "accept its licence" in gated
    assert hub.file_gets() == []  # nothing was downloaded for either


def test_an_unreachable_hub_fails_each_model_in_one_line_without_retrying_for_long(repo_folders, tmp_path):
    hub = _start_hub(repo_folders)
    hub.stop()  # nothing listens on its port any more
    done = _models("fetch", tmp_path / "hf-home", hub, "--device", "cpu")
    assert done.returncode == 1
    for role in ("prior", "phi", "refiner"):
        assert "the Hugging Face Hub could not be reached" in _one_problem_line(done, role)
    # The first request fails at once; huggingface_hub's download calls would retry with back-off
    # (1, 2, 4, 8, 8 s) for each model before giving up.
    assert "Retrying in" not in done.stderr, done.stderr[-2000:]
