"""Suite-wide settings: no test may reach a network (Hugging Face hub included), and torch runs one
intra-op thread per test process (on a 2-core CI machine OpenMP spinning makes the suite's small
tensor ops many times slower, and child processes such as `dreamflow serve` need the other core)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One torch thread during each test, restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

# In-process server and client fixtures for the server and reliability suites.
from server_support import make_client, make_server  # noqa: E402,F401
