"""Kafka plumbing: the local brokers, client properties passed through, topic creation."""

from __future__ import annotations

import os
import socket
import uuid

import pytest
from confluent_kafka import KafkaException, Producer
from confluent_kafka.admin import AdminClient, ConfigResource
from pipeline_support import read_topic
from prometheus_client import CollectorRegistry

from consumers import kafka, settings
from consumers.brokers import apache_kafka
from consumers.brokers.launch import BROKER_KINDS, local_broker
from consumers.brokers.process import BrokerError
from consumers.metrics import Metrics
from consumers.models import MODELS_FETCH_WAIT_MS, ModelFollower
from consumers.runtime import Runtime
from fpocmh_core.config import ConfigError

pytestmark = pytest.mark.broker


@pytest.mark.apache_kafka
@pytest.mark.parametrize("kind", BROKER_KINDS)
def test_a_local_broker_starts_on_a_free_port_answers_metadata_and_stops_on_exit(kind, tmp_path):
    broker = local_broker(kind, log_path=tmp_path / f"{kind}.log")
    with broker as bootstrap:
        host, _, port = bootstrap.rpartition(":")
        assert host == "127.0.0.1"
        assert AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=5).brokers
        proc = broker.proc
    assert proc.poll() is not None, "the broker process is gone after the block"
    with pytest.raises(OSError):
        socket.create_connection((host, int(port)), timeout=1).close()
    assert (tmp_path / f"{kind}.log").stat().st_size > 0, "the broker logged to its file"


@pytest.mark.apache_kafka
def test_apache_kafka_killed_and_restarted_on_its_log_directory_keeps_acknowledged_messages(tmp_path):
    broker = apache_kafka.ApacheKafkaBroker(log_path=tmp_path / "kafka.log", log_dir=tmp_path / "kraft")
    with broker as bootstrap:
        cfg = settings.load(None, ["topics.arrivals=restart.arrivals"], bootstrap, environ={})
        kafka.ensure_topics(cfg)
        producer = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
        for i in range(100):
            producer.produce(cfg.topics.arrivals, str(i).encode(), key=str(i).encode())
        assert producer.flush(30) == 0
        broker.kill()
        assert broker.exit_code() is None and broker.proc is None
        assert broker.restart() == bootstrap, "same ports after the restart"
        values = [m.value() for m in read_topic(cfg, cfg.topics.arrivals, 100)]
    assert sorted(int(v) for v in values) == list(range(100))
    assert (tmp_path / "kraft" / "data" / "meta.properties").is_file(), "a log directory we gave is kept"


@pytest.mark.apache_kafka
def test_a_cluster_id_that_starts_with_a_dash_formats_the_log_directory(tmp_path, monkeypatch):
    # base64 of a random UUID starts with "-" one time in 64; the storage tool must not read it as an option.
    monkeypatch.setattr(apache_kafka.uuid, "uuid4", lambda: uuid.UUID(bytes=b"\xf8" + bytes(15)))
    with apache_kafka.ApacheKafkaBroker(log_path=tmp_path / "kafka.log", log_dir=tmp_path / "kraft") as bootstrap:
        assert AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=5).brokers
    assert "cluster.id=-" in (tmp_path / "kraft" / "data" / "meta.properties").read_text()


def test_readers_of_quiet_topics_wait_long_only_where_the_broker_answers_a_waiting_fetch_at_once(pipeline_cfg):
    # tansu holds an empty fetch for its whole wait, so there the short configured wait is the latency.
    tansu = kafka.is_tansu(pipeline_cfg)
    expected = pipeline_cfg.query.fetch_wait_max_ms if tansu else kafka.LONG_POLL_MS
    assert kafka.query_fetch_wait_ms(pipeline_cfg) == expected
    rt = Runtime(pipeline_cfg, "query", Metrics(CollectorRegistry()))
    follower = ModelFollower(rt)
    try:
        expected = MODELS_FETCH_WAIT_MS if tansu else kafka.LONG_POLL_MS
        assert follower.fetch_wait_ms == expected
    finally:
        follower.close()


def test_apache_kafka_without_its_jars_names_the_install_command(tmp_path):
    with pytest.raises(BrokerError, match="make install") as raised:
        apache_kafka.ApacheKafkaBroker(home=tmp_path / "nowhere")
    assert "\n" not in str(raised.value)


def test_the_compose_image_runs_the_kafka_version_the_local_broker_fetches():
    import yaml

    compose = yaml.safe_load((apache_kafka.ROOT / "docker-compose.yml").read_text())
    assert compose["services"]["kafka"]["image"] == f"apache/kafka:{apache_kafka.kafka_version()}"


def test_kafka_properties_pass_through_to_every_client_from_file_env_and_flags(tmp_path):
    deployment = tmp_path / "deploy.yaml"
    deployment.write_text("kafka:\n  security.protocol: SASL_SSL\n  sasl.mechanisms: PLAIN\n  linger.ms: 7\n")
    cfg = settings.load(
        deployment,
        ["kafka.sasl.username=alice", "kafka.ssl.ca.location=/etc/ca.pem", "encoder.batch_size=9"],
        bootstrap="broker-1:9093",
        environ={"FPOCMH_KAFKA_SASL_PASSWORD": "s3cret"},
    )
    expected = {
        "bootstrap.servers": "broker-1:9093",
        "security.protocol": "SASL_SSL",
        "sasl.mechanisms": "PLAIN",
        "sasl.username": "alice",
        "sasl.password": "s3cret",
        "ssl.ca.location": "/etc/ca.pem",
        "linger.ms": "7",
    }
    for conf in (
        kafka.producer_config(cfg, "encoder"),
        kafka.consumer_config(cfg, "encoder", "g", 10),
        kafka.admin_config(cfg),
    ):
        assert expected.items() <= conf.items()
    assert cfg.encoder.batch_size == 9


def test_passed_through_properties_reach_librdkafka(pipeline_cfg):
    cfg = settings.load(None, ["kafka.security.protocol=no-such-protocol"], pipeline_cfg.bootstrap_servers, {})
    with pytest.raises(KafkaException, match="security.protocol"):
        Producer(kafka.producer_config(cfg, "test"))


def test_properties_the_roles_own_cannot_be_overridden():
    with pytest.raises(ConfigError, match="enable.auto.commit"):
        settings.load(None, ["kafka.enable.auto.commit=true"], environ={})


def test_a_misspelt_isolation_level_is_refused_naming_the_levels():
    with pytest.raises(ConfigError, match="read_committed"):
        settings.load(None, ["query.isolation_level=read_comitted"], environ={})


def test_topics_are_created_once_with_their_partitions_and_the_codes_topic_compacted(pipeline_cfg):
    assert kafka.ensure_topics(pipeline_cfg) == [], "the fixture created them; a second call creates nothing"
    admin = AdminClient(kafka.admin_config(pipeline_cfg))
    meta = admin.list_topics(timeout=10).topics
    for name in kafka.TOPIC_NAMES:
        assert len(meta[getattr(pipeline_cfg.topics, name)].partitions) == getattr(pipeline_cfg.partitions, name)
    resource = ConfigResource(ConfigResource.Type.TOPIC, pipeline_cfg.topics.codes)
    described = admin.describe_configs([resource])[resource].result(10)
    assert described["cleanup.policy"].value == "compact"


def test_broker_kind_next_to_a_configured_kafka_is_refused_in_one_line(capsys):
    from fpocmh import cli

    assert cli.main(["run", "--broker", "kafka", "--bootstrap", "broker-1:9092"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--broker kafka" in line and "broker-1:9092" in line


def test_fpocmh_broker_exits_non_zero_in_one_line_when_its_broker_dies(tmp_path):
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "fpocmh", "broker", "--kind", "tansu"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert "broker ready" in proc.stdout.readline()
        (child,) = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        os.kill(int(child), signal.SIGKILL)
        assert proc.wait(30) == 1
    finally:
        proc.kill()
    errors = [line for line in proc.stderr.read().splitlines() if "error" in line]
    assert len(errors) == 1 and "tansu broker exited" in errors[0]
