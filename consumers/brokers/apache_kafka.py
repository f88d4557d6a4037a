"""A local Apache Kafka: one KRaft node (broker and controller) from the jars ``make install`` fetched.

The version is the one pinned in ``deploy/kafka/pom.xml`` (docker-compose.yml's image carries the same);
``scripts/fetch_kafka.sh`` copies its jars to ``.kafka/<version>/libs`` and writes the list of them last,
so a half-finished download counts as missing. The launcher formats a log directory (a fresh temporary
one unless given), starts ``kafka.Kafka`` with a bounded heap on free loopback ports, waits until the
metadata answers, stops with SIGTERM (a controlled shutdown), and can be killed and restarted on the
same log directory and ports for fault tests.
"""

from __future__ import annotations

import base64
import re
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from types import TracebackType
from typing import Any

from consumers.brokers.process import BrokerError, BrokerProcess, free_port
from consumers.brokers.security import BrokerSecurity

ROOT = Path(__file__).resolve().parents[2]
POM = ROOT / "deploy" / "kafka" / "pom.xml"
LOG4J_CONFIG = ROOT / "deploy" / "kafka" / "log4j2.properties"
INSTALL_HINT = "run `make install` (scripts/fetch_kafka.sh fetches the broker with Maven)"
HEAP = "-Xmx512m"
# The client JIT only (C1). Under the query benchmark the server JIT's compiler thread kept a fifth of a
# core busy for minutes, pre-empting the shards' scans on a 2-core machine; without it the broker also
# moved more (produce -> consume bound 86,000-110,000 against 68,000-78,000 items/s, alternated runs;
# `git show 088051d:README.md`, "Query tier" and "Streaming pipeline"). A short-lived local broker rarely earns
# back what the server JIT costs.
JIT = "-XX:TieredStopAtLevel=1"

# A single node: internal topics with one replica, groups that form at once, topics only on purpose
# (as in docker-compose.yml). Small internal topics start faster; tests and benchmarks add their own.
BASE_PROPERTIES: dict[str, str] = {
    "process.roles": "broker,controller",
    "controller.listener.names": "CONTROLLER",
    "inter.broker.listener.name": "PLAINTEXT",
    "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
    "offsets.topic.replication.factor": "1",
    "offsets.topic.num.partitions": "4",
    "transaction.state.log.replication.factor": "1",
    "transaction.state.log.min.isr": "1",
    "transaction.state.log.num.partitions": "4",
    "share.coordinator.state.topic.replication.factor": "1",
    "share.coordinator.state.topic.min.isr": "1",
    "group.initial.rebalance.delay.ms": "0",
    "auto.create.topics.enable": "false",
    "num.partitions": "1",
    # A restarted node waits until the controller expires its previous session (9 s by default).
    "broker.heartbeat.interval.ms": "500",
    "broker.session.timeout.ms": "2000",
}


@cache
def kafka_version() -> str:
    """The Apache Kafka version pinned in deploy/kafka/pom.xml."""
    match = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", POM.read_text())
    if match is None:
        raise BrokerError(f"{POM}: no <kafka.version>")
    return match.group(1)


def kafka_libs(home: Path | None = None) -> Path:
    """The folder of the broker's jars; :class:`BrokerError` naming the install command if Java or a jar is missing."""
    libs = (home or ROOT / ".kafka" / kafka_version()) / "libs"
    if shutil.which("java") is None:
        raise BrokerError(f"Apache Kafka needs Java, which is not installed: {INSTALL_HINT}")
    marker = libs.parent / "COMPLETE"
    jars = marker.read_text().split() if marker.is_file() else []
    if not jars or not all((libs / jar).is_file() for jar in jars):
        raise BrokerError(f"Apache Kafka {kafka_version()} is not fetched into {libs}: {INSTALL_HINT}")
    return libs


def new_cluster_id() -> str:
    """A random KRaft cluster id (16 bytes, URL-safe base64, as ``kafka-storage random-uuid`` prints)."""
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


def write_properties(path: Path, props: Mapping[str, str]) -> Path:
    path.write_text("".join(f"{key}={value}\n" for key, value in props.items()))
    return path


class ApacheKafkaBroker(BrokerProcess):
    """``with ApacheKafkaBroker() as bootstrap: ...``; ``kill()`` then ``restart()`` for fault tests.

    ``properties`` are extra server properties (e.g. ``{"log.cleaner.backoff.ms": "100"}``), applied last.
    ``security`` secures the node (:mod:`consumers.brokers.security`): the bootstrap address is then its
    SASL_SSL listener, and its principals exist with their passwords in the credentials folder once
    :meth:`start` returns.
    Alone it is node 1 and its own quorum; as a node of a cluster (:mod:`~consumers.brokers.cluster`) it
    gets its ``node_id``, its ``controller_port``, the quorum's ``voters`` and the ``cluster_id`` every node
    is formatted with.
    """

    kind = "kafka"
    stop_signal = signal.SIGTERM
    # A JVM on a busy two-core machine: start-up takes seconds, not milliseconds.
    start_timeout_s = 120.0

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        log_path: Path | None = None,
        log_dir: Path | None = None,
        properties: Mapping[str, Any] | None = None,
        home: Path | None = None,
        security: BrokerSecurity | None = None,
        node_id: int = 1,
        controller_port: int | None = None,
        voters: str | None = None,
        cluster_id: str | None = None,
        heap: str = HEAP,
    ) -> None:
        super().__init__(host, port, log_path)
        self.security = security
        self._provisioned = False
        self.libs = kafka_libs(home)
        self.properties = {key: str(value) for key, value in (properties or {}).items()}
        # A temporary log directory is made at the first start (and removed on exit), not here.
        self._own_dir = log_dir is None
        self.log_dir = None if log_dir is None else Path(log_dir)
        self.controller_port = controller_port
        self.node_id = node_id
        self.voters = voters
        self.cluster_id = cluster_id
        self.heap = heap

    def java(self, main: str, *args: str, heap: str | None = None) -> list[str]:
        return [
            "java",
            heap or self.heap,
            # TLS wants the server JIT: AES-GCM's and GHASH's intrinsics are C2's, and with the client JIT
            # alone a secured node moved a third of a plaintext one's ingest (docs/security.md).
            *([] if self.security else [JIT]),
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={LOG4J_CONFIG}",
            "-cp",
            f"{self.libs}/*",
            main,
            *args,
        ]

    def server_properties(self, log_dir: Path) -> dict[str, str]:
        listener, controller = f"{self.host}:{self.port}", f"{self.host}:{self.controller_port}"
        return {
            **BASE_PROPERTIES,
            "node.id": str(self.node_id),
            "listeners": f"PLAINTEXT://{listener},CONTROLLER://{controller}",
            "advertised.listeners": f"PLAINTEXT://{listener}",
            "controller.quorum.voters": self.voters or f"{self.node_id}@{controller}",
            "log.dirs": str(log_dir / "data"),
            **(
                self.security.server_properties(self.host, self.port, self.controller_port, log_dir)
                if self.security
                else {}
            ),
            **self.properties,
        }

    def ready_client(self) -> dict | None:
        return None if self.security is None else self.security.internal_client()

    def start(self, timeout: float | None = None) -> str:
        bootstrap = super().start(timeout)
        # Users live in the metadata log: a restart on the same log directory keeps them and their passwords.
        if self.security is not None and not self._provisioned:
            self.security.provision()
            self._provisioned = True
        return bootstrap

    def command(self) -> list[str]:
        self.controller_port = self.controller_port or free_port(self.host)
        if self.log_dir is None:
            self.log_dir = Path(tempfile.mkdtemp(prefix="fpocmh-kafka-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # Private: a secured node's properties hold its broker password.
        props = write_properties(self.log_dir / "server.properties", self.server_properties(self.log_dir))
        props.chmod(0o600)
        if not (self.log_dir / "data" / "meta.properties").is_file():
            self._format(props)
        return self.java("kafka.Kafka", str(props))

    def _format(self, props: Path) -> None:
        # One in 64 such ids starts with "-": only the "--cluster-id=" form keeps it from reading as an option.
        cluster_id = self.cluster_id or new_cluster_id()
        # The storage tool is a short-lived JVM: a small heap.
        argv = self.java(
            "kafka.tools.StorageTool", "format", f"--cluster-id={cluster_id}", "-c", str(props), heap="-Xmx256m"
        )
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise BrokerError(f"formatting {props.parent} failed: {(done.stdout + done.stderr).strip()[-500:]}")

    def restart(self, timeout: float | None = None) -> str:
        """Start again on the same log directory and ports (after :meth:`kill` or :meth:`stop`)."""
        self.stop()
        return self.start(timeout)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        if self._own_dir and self.log_dir is not None:
            shutil.rmtree(self.log_dir, ignore_errors=True)
            self.log_dir = None
