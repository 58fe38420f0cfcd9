"""Suite-wide settings: no test may reach a network (Hugging Face hub included)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# In-process server and client fixtures for the server and reliability suites.
from server_support import make_client, make_server  # noqa: E402,F401
