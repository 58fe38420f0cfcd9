"""A doorbell that lets any thread wake a ZeroMQ poll loop owned by another thread.

ZeroMQ sockets must stay in the thread that uses them, so other threads hand work over through
thread-safe queues and ring this bell; the loop polls the bell's socket next to its ZeroMQ
sockets and wakes at once instead of waiting for a poll timeout. A local socket pair (not a
pipe) because zmq_poll accepts native sockets on every platform, Windows included.
"""

from __future__ import annotations

import socket


class Doorbell:
    """Ring from any thread; the owner polls ``fileno()`` and calls ``drain()`` when it is readable."""

    def __init__(self) -> None:
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)

    def fileno(self) -> int:
        """The descriptor a poller watches for readability."""
        return self._reader.fileno()

    def ring(self) -> None:
        """Wake the owner; ringing an already ringing bell is harmless."""
        try:
            self._writer.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # the buffer is full: the owner is due to wake anyway, or the bell is closed

    def drain(self) -> None:
        """Consume the pending rings."""
        try:
            while self._reader.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        """Release both ends."""
        self._reader.close()
        self._writer.close()
