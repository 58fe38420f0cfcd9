"""The ZeroMQ job server and its on-disk job store."""

from .server import Server, ServerConfigError, is_loopback
from .store import JobRecord, JobStore, StoreError
from .worker import JobSink, Worker

__all__ = ["Server", "ServerConfigError", "is_loopback", "JobRecord", "JobStore", "StoreError", "JobSink", "Worker"]
