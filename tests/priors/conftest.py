"""Tiny random diffusers pipelines on disk, built once per test session."""

import pytest

from dreamflow.priors.tiny import tiny_sdxl_refiner, tiny_stable_diffusion


@pytest.fixture(scope="session")
def tiny_sd_eps(tmp_path_factory):
    return tiny_stable_diffusion(tmp_path_factory.mktemp("tiny-sd-eps"), "epsilon")


@pytest.fixture(scope="session")
def tiny_sd_v(tmp_path_factory):
    return tiny_stable_diffusion(tmp_path_factory.mktemp("tiny-sd-v"), "v_prediction")


@pytest.fixture(scope="session")
def tiny_refiner(tmp_path_factory):
    return tiny_sdxl_refiner(tmp_path_factory.mktemp("tiny-sdxl-refiner"))
