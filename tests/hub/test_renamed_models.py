"""Models removed from the Hub that live on under another id (priors.hub.RENAMED_MODELS), offline.

Stability AI removed SD 2.1 and 2.1-base from the Hub; sd2-community's mirrors hold the same files
and are the paper preset's defaults now. A cache filled before the removal (the old ids) and one
filled after it (the mirrors) must both serve the paper preset and any settings naming either id,
without a request; what neither cache holds is a one-line error naming both ids.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from offline_hub import (MIRROR_OF, PAPER_MODELS, REMOVED_SD21, REMOVED_SD21_BASE, SD21, SD21_BASE, SDXL_REFINER,
                         cache_listing, commit_of)

from dreamflow.config import ConfigError
from dreamflow.pipeline.config import build_config
from dreamflow.priors import hub
from dreamflow.priors.hub import PriorLoadError, locate, not_on_hub_error
from dreamflow.priors.loading import load_diffusion_prior


@pytest.fixture
def no_downloads(monkeypatch):
    """Any attempt to reach the Hub fails the test."""
    def refuse(model, *args, **kwargs):
        raise AssertionError(f"the Hub was asked for {model}")

    monkeypatch.setattr(hub, "_download", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the network would be allowed: nothing may use it


def _use_cache(monkeypatch, home: Path) -> None:
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)


def test_the_paper_defaults_are_the_mirrors_and_the_old_ids_map_onto_them():
    prior = build_config("paper").prior
    assert (prior.model, prior.phi_model, prior.refiner_model) == PAPER_MODELS
    assert hub.RENAMED_MODELS == MIRROR_OF
    assert hub.same_model_ids(SD21) == (SD21, REMOVED_SD21)
    assert hub.same_model_ids(REMOVED_SD21_BASE) == (REMOVED_SD21_BASE, SD21_BASE)
    assert hub.same_model_ids(SDXL_REFINER) == (SDXL_REFINER,)


def test_a_cache_filled_before_the_removal_serves_the_mirror_ids_without_a_request(
        offline_hub_before_removal, monkeypatch, no_downloads, caplog):
    _use_cache(monkeypatch, offline_hub_before_removal)
    before = cache_listing(offline_hub_before_removal)
    with caplog.at_level(logging.INFO, logger=hub.__name__):
        files = locate(SD21_BASE, "prior")
        phi = load_diffusion_prior(SD21, "phi", dtype="float32")
    assert (files.model, files.named, files.source) == (REMOVED_SD21_BASE, SD21_BASE, "cache")
    assert files.commit == commit_of(REMOVED_SD21_BASE)
    assert phi.prediction_type == "v_prediction" and phi.model_id == REMOVED_SD21
    assert caplog.records == []  # nothing to tell: the files were there
    assert cache_listing(offline_hub_before_removal) == before
    # A pinned revision means that commit's files, which a cache under the other name cannot have.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PriorLoadError, match=rf"^model '{SD21_BASE}'.*not in the Hugging Face cache.*network is off"):
        locate(SD21_BASE, "prior", revision=commit_of(SD21_BASE))


def test_an_old_id_in_the_cache_is_used_as_it_is_named(offline_hub_before_removal, monkeypatch, no_downloads):
    _use_cache(monkeypatch, offline_hub_before_removal)
    files = locate(REMOVED_SD21, "phi")
    assert (files.model, files.named) == (REMOVED_SD21, None)


def test_an_old_id_missing_from_the_cache_is_served_by_its_mirror(hub_env, monkeypatch, no_downloads):
    files = locate(REMOVED_SD21, "phi")
    assert (files.model, files.named, files.commit) == (SD21, REMOVED_SD21, commit_of(SD21))
    prior = load_diffusion_prior(REMOVED_SD21_BASE, "prior", dtype="float32")
    assert prior.prediction_type == "epsilon" and prior.model_id == SD21_BASE


def test_neither_name_in_the_cache_is_one_line_naming_both(tmp_path, monkeypatch):
    _use_cache(monkeypatch, tmp_path / "empty")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for named, other in ((REMOVED_SD21_BASE, SD21_BASE), (SD21, REMOVED_SD21)):
        with pytest.raises(PriorLoadError) as err:
            locate(named, "prior")
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith(f"model '{named}'")
        assert f"nor is the same model under '{other}'" in msg and "dreamflow models fetch" in msg
    assert not (tmp_path / "empty").exists()


def test_an_id_the_hub_does_not_have_names_the_id_that_holds_its_files():
    removed = str(not_on_hub_error(REMOVED_SD21_BASE, "prior"))
    assert removed == (f"model '{REMOVED_SD21_BASE}' (the prior D_p of stages 1-2, prior.model): is not on the "
                       f"Hugging Face Hub. To fix: set prior.model to {SD21_BASE}, which holds the same files.")
    unknown = str(not_on_hub_error("org/no-such-model", "phi"))
    assert "'org/no-such-model'" in unknown and "is not on the Hugging Face Hub" in unknown
    assert "check the id" in unknown and "sd2-community" not in unknown


# -- revisions ------------------------------------------------------------------------------------
@pytest.mark.parametrize("revision", ["../../etc", "main/../x", "", "-rf", "a" * 39 + "/", "x.lock"])
def test_a_revision_that_cannot_name_a_hub_revision_is_refused_by_the_settings(revision):
    with pytest.raises(ConfigError, match=r"^prior.phi_model_revision = .* is not a Hugging Face revision"):
        build_config("paper", {"prior.phi_model_revision": revision})
    with pytest.raises(PriorLoadError, match=r"revision .* is not a Hugging Face revision"):
        locate(SD21, "phi", revision=revision)


def test_a_pinned_revision_is_read_from_the_cache_and_an_absent_one_is_named(hub_env, no_downloads, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    commit = commit_of(SD21_BASE)
    config = build_config("paper", {"prior.model_revision": commit, "prior.refiner_model_revision": "v1.0"})
    assert (config.prior.model_revision, config.prior.phi_model_revision) == (commit, "main")
    files = locate(SD21_BASE, "prior", revision=commit)
    assert files.commit == commit
    with pytest.raises(PriorLoadError, match=rf"^model '{SD21_BASE}'.*not in the Hugging Face cache"):
        locate(SD21_BASE, "prior", revision="0" * 40)


# -- dreamflow models list --------------------------------------------------------------------------
def _models_list(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HOME=str(home), HF_HUB_OFFLINE="1")
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([sys.executable, "-m", "dreamflow", "models", "list", "--preset", "paper", *args],
                          capture_output=True, text=True, env=env)


def test_models_list_says_which_id_is_present_under_which_name(offline_hub, offline_hub_before_removal):
    old_cache = _models_list(offline_hub_before_removal)
    assert old_cache.returncode == 0, old_cache.stdout + old_cache.stderr[-2000:]
    rows = [line.split() for line in old_cache.stdout.splitlines() if line.startswith(("prior", "phi", "refiner"))]
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("prior", SD21_BASE, f"main@{commit_of(REMOVED_SD21_BASE)[:7]}"),
        ("phi", SD21, f"main@{commit_of(REMOVED_SD21)[:7]}"),
        ("refiner", SDXL_REFINER, f"main@{commit_of(SDXL_REFINER)[:7]}")]
    assert all("ready" in r for r in rows)
    notes = [line.strip() for line in old_cache.stdout.splitlines() if "present as" in line]
    assert notes == [f"prior: {SD21_BASE} -> present as {REMOVED_SD21_BASE} (the same files)",
                     f"phi: {SD21} -> present as {REMOVED_SD21} (the same files)"]

    pinned = commit_of(SD21)
    new_cache = _models_list(offline_hub, "--set", f"prior.model={REMOVED_SD21_BASE}",
                             "--set", f"prior.phi_model_revision={pinned}")
    assert new_cache.returncode == 0, new_cache.stdout + new_cache.stderr[-2000:]
    rows = [line.split() for line in new_cache.stdout.splitlines() if line.startswith(("prior", "phi"))]
    assert [(r[0], r[1], r[2]) for r in rows] == [("prior", REMOVED_SD21_BASE, f"main@{commit_of(SD21_BASE)[:7]}"),
                                                  ("phi", SD21, pinned)]
    notes = [line.strip() for line in new_cache.stdout.splitlines() if "present as" in line]
    assert notes == [f"prior: {REMOVED_SD21_BASE} -> present as {SD21_BASE} (the same files)"]
