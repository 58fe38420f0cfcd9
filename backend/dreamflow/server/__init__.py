"""The ZeroMQ job server and its on-disk job store."""

from .server import Server, ServerConfigError
from .store import JobRecord, JobStore, StoreError
from .worker import JobSink, Worker

__all__ = ["Server", "ServerConfigError", "JobRecord", "JobStore", "StoreError", "JobSink", "Worker"]
