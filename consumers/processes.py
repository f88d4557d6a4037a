"""Roles as child processes (``python -m fpocmh <role>``), as ``fpocmh run`` and the benchmark start them.

Each child gets the parent's effective config as a YAML file, so every process sees the same topics,
groups and client properties. Stopping is SIGTERM (finish the batch, flush, commit, close), then a
kill only if that takes longer than the grace period.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)


class RoleProcess:
    def __init__(self, command: str, config_path: Path, log_path: Path, *extra: str) -> None:
        self.command = command
        self.log_path = log_path
        self.argv = [sys.executable, "-m", "fpocmh", command, "--config", str(config_path), *extra]
        self.proc: subprocess.Popen | None = None

    def start(self) -> RoleProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT)
        log.info("started %s (pid %d, log %s)", self.command, self.proc.pid, self.log_path)
        return self

    def check_alive(self) -> None:
        """Raise with the tail of the role's log if it has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace").splitlines()[-15:]
            raise RuntimeError(f"{self.command} exited with code {self.proc.returncode}:\n" + "\n".join(tail))

    def stop(self, grace_s: float = 60.0) -> int | None:
        """SIGTERM and wait; returns the exit code (None if it had to be killed)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                return proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0f s after SIGTERM; killing it", self.command, grace_s)
                proc.kill()
                proc.wait()
                return None
        return proc.returncode
