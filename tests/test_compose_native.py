"""docker-compose.yml's roles, run natively: each project service's command with that service's
environment, as local processes against Apache Kafka of the compose file's version.

Docker cannot run here, so the broker is the local Apache Kafka with the compose file's broker settings,
and compose's in-network address of Kafka becomes the local bootstrap. The run is shortened the way a
user would shorten it, through the environment every role reads: P1 in one chunk of paired items, and a
small untrained DLCH version 0. Images, volumes and networks stay covered by tests/test_deploy.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pipeline_support import wait_until

from consumers.brokers.apache_kafka import ApacheKafkaBroker, kafka_version
from consumers.brokers.process import free_port
from consumers.kafka import TOPIC_NAMES, partitions_of
from consumers.query.role import QueryClient
from consumers.settings import load
from fpocmh_core import config
from fpocmh_core.protocols import P1Config, p1_split

pytestmark = [pytest.mark.broker, pytest.mark.apache_kafka]

ROOT = Path(__file__).resolve().parents[1]
# What the launcher owns on one host: node identity, listeners and storage.
TOPOLOGY = {
    "NODE_ID",
    "PROCESS_ROLES",
    "CONTROLLER_QUORUM_VOTERS",
    "CONTROLLER_LISTENER_NAMES",
    "LISTENERS",
    "ADVERTISED_LISTENERS",
    "LISTENER_SECURITY_PROTOCOL_MAP",
    "INTER_BROKER_LISTENER_NAME",
    "LOG_DIRS",
}
# The shortened run, as environment every service gets (a compose override file would do the same).
SHORT_RUN = {
    "FPOCMH_P1__N_CHUNKS": "1",
    "FPOCMH_P1__UNIMODAL_SHARE": "0",
    "FPOCMH_PIPELINE__METHOD": "dlch",
    "FPOCMH_PIPELINE__LEARNER__BOOTSTRAP_OVERRIDES": "{original.epochs: 0, hidden: [64], label_hidden: [64]}",
    "FPOCMH_PIPELINE__REPLAY__SCORE_TOPK": "100",
}
# Services whose section of config/pipeline.yaml has a metrics_port.
ROLE_SECTIONS = ("encoder", "learner", "query", "replay")
# The long-running services, the query tier as its two shards.
ROLES = ("encoder", "learner", "query-s0", "query-s1")
REPLAY_ARGS = ["--rate", "5000", "--quiet"]
SCORE_LINE = re.compile(r"chunk +(-?\d+): .* store +(\d+) img \+ +(\d+) txt codes .* I->T ([\d.]+) +T->I ([\d.]+)")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def broker_properties(kafka_env: dict) -> dict[str, str]:
    """Compose's KAFKA_* settings as server properties (the apache/kafka image's own mapping)."""
    return {
        key[len("KAFKA_") :].lower().replace("_", "."): str(value)
        for key, value in kafka_env.items()
        if key.startswith("KAFKA_") and key[len("KAFKA_") :] not in TOPOLOGY
    }


def in_network_address(kafka_env: dict) -> str:
    """The address the roles use inside compose's network (the inter-broker listener's advertised one)."""
    name = kafka_env["KAFKA_INTER_BROKER_LISTENER_NAME"]
    listeners = dict(item.split("://") for item in kafka_env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    return listeners[name]


def service_env(service: dict, address: str, bootstrap: str, section: str | None, data: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("FPOCMH_")}
    for key, value in service.get("environment", {}).items():
        # Compose's Kafka host becomes the local broker; /metrics stays on loopback on a shared machine.
        env[key] = str(value).replace(address, bootstrap).replace("0.0.0.0", "127.0.0.1")
    env.update(SHORT_RUN)
    # The image's FPOCMH_DATA=/data mount, the image's /app on the path, and a free /metrics port.
    env.update({"FPOCMH_DATA": str(data.resolve()), "PYTHONPATH": str(ROOT)})
    if section is not None:
        env[f"FPOCMH_PIPELINE__{section.upper()}__METRICS_PORT"] = str(free_port())
    return env


def service_argv(service: dict) -> list[str]:
    entrypoint = service.get("entrypoint", ["fpocmh"])
    assert entrypoint[0] == "fpocmh"
    return [sys.executable, "-m", "fpocmh", *entrypoint[1:], *service.get("command", [])]


def test_the_compose_roles_run_natively_against_apache_kafka_replay_scores_and_the_store_fills(
    compose, benchmark_path, mirflickr, tmp_path
):
    services = compose["services"]
    kafka = services["kafka"]
    assert kafka["image"] == f"apache/kafka:{kafka_version()}", "the local broker is the compose file's version"
    address = in_network_address(kafka["environment"])
    broker = ApacheKafkaBroker(log_path=tmp_path / "kafka.log", properties=broker_properties(kafka["environment"]))
    with broker as bootstrap:

        def env(name: str) -> dict[str, str]:
            section = name.partition("-")[0] if name.partition("-")[0] in ROLE_SECTIONS else None
            return service_env(services[name], address, bootstrap, section, benchmark_path)

        # The container's working directory (/app): the learner's checkpoints (runs/learner) land here.
        work = tmp_path / "app"
        work.mkdir()
        init = subprocess.run(
            service_argv(services["topics-init"]), env=env("topics-init"), cwd=work, capture_output=True, text=True
        )
        assert init.returncode == 0, init.stderr[-2000:]
        cfg = load(environ={**env("encoder"), "FPOCMH_KAFKA_BOOTSTRAP_SERVERS": bootstrap})
        roles = {}
        try:
            for name in ROLES:
                with (tmp_path / f"{name}.log").open("wb") as log:
                    roles[name] = subprocess.Popen(
                        service_argv(services[name]), env=env(name), cwd=work, stdout=log, stderr=subprocess.STDOUT
                    )
            with QueryClient(cfg) as client:
                wait_until(lambda: ready(client, roles), timeout_s=180, what="the query role serving")
            replay = subprocess.run(
                [*service_argv(services["replay"]), *REPLAY_ARGS],
                env=env("replay"),
                cwd=work,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert replay.returncode == 0, replay.stdout[-2000:] + replay.stderr[-3000:]
            for name, proc in roles.items():
                assert proc.poll() is None, f"{name} exited: {(tmp_path / f'{name}.log').read_text()[-2000:]}"
        finally:
            for proc in roles.values():
                proc.terminate()
            exits = {name: proc.wait(60) for name, proc in roles.items()}
        topics = {getattr(cfg.topics, name): getattr(cfg.partitions, name) for name in TOPIC_NAMES}
        with QueryClient(cfg) as client:
            created = {topic: len(partitions_of(client.consumer, topic)) for topic in topics}
    assert created == topics, "topics-init created every topic with its partition count"
    assert exits == dict.fromkeys(ROLES, 0), "every role stopped cleanly on SIGTERM"

    p1cfg = config.load(P1Config, "p1", overrides={"n_chunks": 1, "unimodal_share": 0.0})
    p1 = p1_split(mirflickr, p1cfg)
    scores = [SCORE_LINE.search(line) for line in replay.stdout.splitlines()]
    scores = [m for m in scores if m]
    assert [int(m[1]) for m in scores] == [-1, 0], replay.stdout
    offline, stream = p1.offline.size, p1.chunks[0].size
    assert [(int(m[2]), int(m[3])) for m in scores] == [(offline, offline), (offline + stream, offline + stream)]
    for m in scores:
        assert 0.3 < float(m[4]) <= 1 and 0.3 < float(m[5]) <= 1, m[0]


def ready(client: QueryClient, roles: dict[str, subprocess.Popen]) -> bool:
    for name, proc in roles.items():
        assert proc.poll() is None, f"{name} exited with code {proc.returncode}"
    try:
        return client.status(timeout_s=2).status == "ok"
    except TimeoutError:
        return False
