"""A local broker as a child process: on free loopback ports, ready once its metadata lists a broker,
stopped by a signal and killed after a bound. Each kind of broker subclasses :class:`BrokerProcess`."""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)


class BrokerError(RuntimeError):
    """A local broker could not be found, started or reached."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_ready(
    bootstrap: str, timeout: float = 30.0, proc: subprocess.Popen | None = None, client: dict | None = None
) -> None:
    """Until the port accepts a connection and the cluster metadata lists a broker (asked with ``client``'s
    properties, e.g. a login, when given)."""
    from confluent_kafka.admin import AdminClient

    client = {"bootstrap.servers": bootstrap, **(client or {})}
    host, _, port = client["bootstrap.servers"].rpartition(":")
    deadline = time.monotonic() + timeout
    admin = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BrokerError(f"broker exited with code {proc.returncode} before it was ready")
        try:
            with socket.create_connection((host, int(port)), timeout=0.5):
                pass
            admin = admin or AdminClient({**client, "log_level": 0})
            if admin.list_topics(timeout=1).brokers:
                return
        except OSError:
            time.sleep(0.05)
        except Exception:  # KafkaException while the broker is still starting
            time.sleep(0.05)
    raise BrokerError(f"no broker answered on {bootstrap} within {timeout:.0f} s")


class BrokerProcess:
    """``with Broker() as bootstrap: ...`` runs a broker for the block and stops it after.

    Subclasses name the command (:meth:`command`, called once the port is chosen) and the stop signal.
    """

    kind = ""
    stop_signal = signal.SIGINT
    start_timeout_s = 30.0

    def __init__(self, host: str = "127.0.0.1", port: int | None = None, log_path: Path | None = None) -> None:
        self.host = host
        self.port = port
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready_client(self) -> dict | None:
        """Client properties of the readiness check (None: plaintext on the bootstrap address)."""
        return None

    def start(self, timeout: float | None = None) -> str:
        self.port = self.port or free_port(self.host)
        if self.log_path is None:
            self.log_path = Path(tempfile.gettempdir()) / f"fpocmh-{self.kind}-{self.port}.log"
        argv = self.command()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as out:
            # Own session: a Ctrl-C in the terminal reaches us, and we stop the broker last.
            self.proc = subprocess.Popen(argv, start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_ready(self.bootstrap, timeout or self.start_timeout_s, self.proc, self.ready_client())
        except BaseException:
            self.stop()
            raise
        log.info("%s broker on %s (pid %d, log %s)", self.kind, self.bootstrap, self.proc.pid, self.log_path)
        return self.bootstrap

    def exit_code(self) -> int | None:
        """None while the broker runs (or was never started); its exit code once it has died."""
        return None if self.proc is None else self.proc.poll()

    def stop(self, timeout: float = 30.0) -> None:
        """The stop signal, then a kill if the broker is still there after ``timeout`` seconds."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(self.stop_signal)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s broker did not stop within %.0f s; killing it", self.kind, timeout)
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """SIGKILL, as a crash would: no shutdown, nothing flushed."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
