"""Which local broker to start: the kinds and the one factory every caller goes through."""

from __future__ import annotations

from typing import Any

from consumers.brokers.apache_kafka import ApacheKafkaBroker
from consumers.brokers.cluster import KafkaCluster
from consumers.brokers.process import BrokerProcess
from consumers.brokers.tansu import EmbeddedBroker

# The kinds of local broker; the first is the default (it needs nothing but the wheel).
BROKER_KINDS = ("tansu", "kafka")


def local_broker(
    kind: str, brokers: int = 1, replication: tuple[int, int] | None = None, **kwargs: Any
) -> BrokerProcess | KafkaCluster:
    """A local broker of ``kind`` (one of :data:`BROKER_KINDS`), not started yet; with ``brokers`` > 1 an
    Apache Kafka cluster whose internal topics get ``replication`` (replicas, min in-sync replicas: the
    pipeline config's, :meth:`~consumers.settings.PipelineConfig.replication`)."""
    if brokers < 1:
        raise ValueError(f"--brokers {brokers}: a local broker has at least one node")
    if brokers > 1:
        if kind != "kafka":
            raise ValueError(f"--brokers {brokers}: only the kafka kind runs as a cluster, not {kind}")
        if replication is None:
            raise ValueError("a local cluster needs its replication (replicas, min in-sync replicas)")
        factor, in_sync = replication
        return KafkaCluster(brokers, replication_factor=factor, min_insync_replicas=in_sync, **kwargs)
    if kind == "tansu":
        return EmbeddedBroker(**kwargs)
    if kind == "kafka":
        return ApacheKafkaBroker(**kwargs)
    raise ValueError(f"unknown broker kind {kind!r}: choose one of {', '.join(BROKER_KINDS)}")
