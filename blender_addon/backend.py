"""An optional local backend process (``dreamflow serve``) that the add-on starts and stops.

No ``bpy`` here: the preferences hand over the executable, its arguments and the address.
The process is stopped when the add-on is disabled and when Blender exits (``atexit``), so a
GPU-holding backend never outlives the session that started it.
"""

from __future__ import annotations

import atexit
import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

DEFAULT_ARGUMENTS = "serve --bind {address}"


class LocalBackend:
    """One child process running the DreamFlow server; its output goes to a log file."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.log_path: Path | None = None
        self._log = None
        atexit.register(self.stop)

    @property
    def running(self) -> bool:
        """True while the child process is alive."""
        return self.process is not None and self.process.poll() is None

    def command(self, executable: str, arguments: str, address: str) -> list[str]:
        """The command line: the executable, then ``arguments`` with ``{address}`` filled in."""
        exe = executable.strip() or "dreamflow"
        found = shutil.which(exe) if os.sep not in exe and "/" not in exe else exe
        if not found or not os.path.exists(found):
            raise FileNotFoundError(f"backend executable {exe!r} not found; set its full path in the "
                                    f"DreamFlow preferences (for example /path/to/.venv/bin/dreamflow)")
        return [found, *shlex.split((arguments or DEFAULT_ARGUMENTS).replace("{address}", address))]

    def start(self, executable: str, arguments: str, address: str) -> list[str]:
        """Start the backend (no-op if running); the command line it runs."""
        if self.running:
            return list(self.process.args)  # type: ignore[union-attr]
        cmd = self.command(executable, arguments, address)
        self.log_path = Path(tempfile.gettempdir()) / f"dreamflow-backend-{os.getpid()}.log"
        self._log = open(self.log_path, "ab")
        kwargs = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP  # type: ignore[attr-defined]
        self.process = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        **kwargs)
        return cmd

    def exit_message(self) -> str:
        """Why the process ended, with the tail of its log; empty while running or never started."""
        if self.process is None or self.running:
            return ""
        tail = ""
        if self.log_path is not None and self.log_path.exists():
            tail = self.log_path.read_text(errors="replace").strip().splitlines()[-3:]
            tail = " | ".join(tail)
        return f"local backend exited with code {self.process.returncode}" + (f": {tail}" if tail else "")

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate the process (kill it if it does not stop within ``timeout`` s)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        if self._log is not None:
            self._log.close()
            self._log = None
