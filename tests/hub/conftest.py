"""An offline Hugging Face cache with the paper preset's models under their real ids (tiny, random)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from offline_hub import PAPER_MODELS_BEFORE_REMOVAL, build_offline_hub  # noqa: E402


@pytest.fixture(scope="session")
def offline_hub(tmp_path_factory) -> Path:
    """The HF_HOME of a cache holding SD 2.1-base, SD 2.1 (v) and the SDXL refiner."""
    return build_offline_hub(tmp_path_factory.mktemp("hf-home"))


@pytest.fixture
def hub_env(offline_hub, monkeypatch) -> Path:
    """This process uses the offline cache, with the network off."""
    monkeypatch.setenv("HF_HOME", str(offline_hub))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return offline_hub


@pytest.fixture(scope="session")
def offline_hub_before_removal(tmp_path_factory) -> Path:
    """The HF_HOME of a cache filled before Stability AI removed SD 2.1: the old ids and the refiner."""
    return build_offline_hub(tmp_path_factory.mktemp("hf-home-old"), PAPER_MODELS_BEFORE_REMOVAL)
