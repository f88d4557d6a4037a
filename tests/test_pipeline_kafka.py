"""Kafka plumbing: the embedded broker, client properties passed through, topic creation."""

from __future__ import annotations

import socket

import pytest
from confluent_kafka import KafkaException, Producer
from confluent_kafka.admin import AdminClient, ConfigResource

from consumers import kafka, settings
from consumers.broker import EmbeddedBroker
from fpocmh_core.config import ConfigError

pytestmark = pytest.mark.broker


def test_the_embedded_broker_starts_on_a_free_port_answers_metadata_and_stops_on_exit(tmp_path):
    broker = EmbeddedBroker(log_path=tmp_path / "tansu.log")
    with broker as bootstrap:
        host, _, port = bootstrap.rpartition(":")
        assert host == "127.0.0.1"
        assert AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=5).brokers
        proc = broker.proc
    assert proc.poll() is not None, "the broker process is gone after the block"
    with pytest.raises(OSError):
        socket.create_connection((host, int(port)), timeout=1).close()


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


def test_topics_are_created_once_with_their_partitions_and_the_codes_topic_compacted(pipeline_cfg):
    assert kafka.ensure_topics(pipeline_cfg) == [], "the fixture created them; a second call creates nothing"
    admin = AdminClient(kafka.admin_config(pipeline_cfg))
    meta = admin.list_topics(timeout=10).topics
    for name in kafka.TOPIC_NAMES:
        assert len(meta[getattr(pipeline_cfg.topics, name)].partitions) == getattr(pipeline_cfg.partitions, name)
    resource = ConfigResource(ConfigResource.Type.TOPIC, pipeline_cfg.topics.codes)
    described = admin.describe_configs([resource])[resource].result(10)
    assert described["cleanup.policy"].value == "compact"
