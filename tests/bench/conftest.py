"""Benchmark tests import the harness from the repository's bench/ folder (not a package)."""

import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def bench_workdir() -> Path:
    """One folder for the tiny random pipelines, shared by every benchmark test."""
    return Path(tempfile.mkdtemp(prefix="dreamflow-bench-tests-"))


@pytest.fixture
def tiny_prior(bench_workdir):
    """A fresh tiny random Stable Diffusion prior (tests change its switches), built through the
    real loading path from a folder written once per session."""
    from bench.arch import build_prior

    return build_prior("tiny", "cpu", workdir=bench_workdir)
