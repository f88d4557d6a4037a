"""Which local broker to start: the kinds and the one factory every caller goes through."""

from __future__ import annotations

from typing import Any

from consumers.brokers.apache_kafka import ApacheKafkaBroker
from consumers.brokers.process import BrokerProcess
from consumers.brokers.tansu import EmbeddedBroker

# The kinds of local broker; the first is the default (it needs nothing but the wheel).
BROKER_KINDS = ("tansu", "kafka")


def local_broker(kind: str, **kwargs: Any) -> BrokerProcess:
    """A local broker of ``kind`` (one of :data:`BROKER_KINDS`), not started yet."""
    if kind == "tansu":
        return EmbeddedBroker(**kwargs)
    if kind == "kafka":
        return ApacheKafkaBroker(**kwargs)
    raise ValueError(f"unknown broker kind {kind!r}: choose one of {', '.join(BROKER_KINDS)}")
