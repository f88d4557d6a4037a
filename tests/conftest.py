"""Shared fixtures. The benchmark file lives in ../shared/data (or $FPOCMH_DATA)."""

from __future__ import annotations

import pytest

from fpocmh_core import config
from fpocmh_core.data import CrossModalDataset, find_dataset, load_dataset
from fpocmh_core.protocols import P1Config, P1Split, p1_split


@pytest.fixture(scope="session")
def benchmark_path():
    return find_dataset()


@pytest.fixture(scope="session")
def mirflickr(benchmark_path) -> CrossModalDataset:
    """The real MIRFlickr-25K benchmark (15,677 items)."""
    return load_dataset(benchmark_path)


@pytest.fixture(scope="session")
def p1_config() -> P1Config:
    return config.load(P1Config, "p1")


@pytest.fixture(scope="session")
def p1(mirflickr, p1_config) -> P1Split:
    return p1_split(mirflickr, p1_config)


@pytest.fixture(scope="session")
def kafka_bootstrap():
    """A real Kafka-protocol broker: ``$FPOCMH_TEST_BROKER`` if set, else tansu started for the session."""
    import os

    external = os.environ.get("FPOCMH_TEST_BROKER")
    if external:
        yield external
        return
    from consumers.broker import EmbeddedBroker

    with EmbeddedBroker() as bootstrap:
        yield bootstrap


@pytest.fixture
def pipeline_cfg(kafka_bootstrap, tmp_path):
    """The pipeline config on the test broker, with this test's own topics, groups and checkpoint folder."""
    import uuid

    from consumers import settings
    from consumers.kafka import TOPIC_NAMES, ensure_topics

    tag = uuid.uuid4().hex[:10]
    sets = [f"topics.{name}=test-{tag}.{name}" for name in TOPIC_NAMES]
    sets += [f"{role}.group=test-{tag}-{role}" for role in ("encoder", "learner", "query")]
    sets += [
        f"learner.checkpoint_dir={tmp_path / 'learner'}",
        f"query.snapshot_dir={tmp_path / 'query-snapshots'}",
        # Short fetch waits and polls: tests wait on round trips, not on throughput.
        "encoder.fetch_wait_max_ms=10",
        "learner.fetch_wait_max_ms=10",
        "encoder.poll_timeout_s=0.05",
        "learner.poll_timeout_s=0.05",
    ]
    # No /metrics servers: tests read their Metrics objects directly, and ports would clash across tests.
    sets += [f"{section}.metrics_port=0" for section in ("encoder", "learner", "query", "replay")]
    cfg = settings.load(None, sets, kafka_bootstrap, environ={})
    ensure_topics(cfg)
    return cfg
