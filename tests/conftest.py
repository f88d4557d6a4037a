"""Shared fixtures. The benchmark file lives in ../shared/data (or $FPOCMH_DATA)."""

from __future__ import annotations

import collections
import os

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


# Every broker test runs on Apache Kafka and on tansu, one session-wide broker of each kind;
# $FPOCMH_TEST_BROKER runs them once, on that broker, instead.
EXTERNAL_BROKER = os.environ.get("FPOCMH_TEST_BROKER", "")
BROKERS = ["external"] if EXTERNAL_BROKER else ["kafka", "tansu"]
# What tansu lacks (../shared/spec/broker.md), for @pytest.mark.requires_kafka("<gap>").
TANSU_GAPS = {
    "compaction": "tansu never compacts (its in-memory store has no compaction)",
    "watermarks": "tansu reports wrong high watermarks (ListOffsets latest)",
    "transactions": "tansu does not honour aborted transactions",
}


@pytest.fixture(scope="session", params=BROKERS)
def kafka_bootstrap(request):
    """A real Kafka-protocol broker: ``$FPOCMH_TEST_BROKER`` if set, else Apache Kafka, then tansu, each
    started once for the session."""
    if request.param == "external":
        yield EXTERNAL_BROKER
        return
    from consumers.brokers.launch import local_broker

    # Apache Kafka's log cleaner looks for work every 100 ms (15 s by default): compaction shows within a test.
    props = {"properties": {"log.cleaner.backoff.ms": 100}} if request.param == "kafka" else {}
    with local_broker(request.param, **props) as bootstrap:
        yield bootstrap


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "requires_kafka(gap): needs what tansu lacks (a key of conftest.TANSU_GAPS); skipped on tansu"
    )
    config.addinivalue_line("markers", "apache_kafka: starts Apache Kafka brokers of its own (counted as Kafka tests)")
    config.addinivalue_line(
        "markers", "secure_kafka: runs against the secured Apache Kafka (counted apart from the per-broker tests)"
    )
    config.addinivalue_line(
        "markers", "kafka_cluster: runs on the three-broker Apache Kafka cluster (once per run, counted on its own)"
    )


def pytest_collection_modifyitems(config, items):
    for item in items:
        marker = item.get_closest_marker("requires_kafka")
        if marker is None:
            continue
        (gap,) = marker.args
        if gap not in TANSU_GAPS:
            raise pytest.UsageError(f"{item.nodeid}: requires_kafka({gap!r}): not one of {sorted(TANSU_GAPS)}")
        if broker_of(item) == "tansu":
            item.add_marker(pytest.mark.skip(reason=f"Apache Kafka only: {TANSU_GAPS[gap]}"))


def broker_of(item) -> str | None:
    callspec = getattr(item, "callspec", None)
    return None if callspec is None else callspec.params.get("kafka_bootstrap")


# Tests that start brokers of their own, by marker, and the broker their counts go under.
MARKED_BROKERS = {"secure_kafka": "secure", "apache_kafka": "kafka", "kafka_cluster": "cluster"}
BROKER_NAMES = {
    "kafka": "Apache Kafka",
    "tansu": "tansu",
    "secure": "Apache Kafka, secured (SASL_SSL, ACLs)",
    "cluster": "Apache Kafka, 3-broker cluster",
}
_outcomes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    broker = broker_of(item) or next(
        (name for marker, name in MARKED_BROKERS.items() if item.get_closest_marker(marker)), None
    )
    if broker and (report.when == "call" or report.outcome != "passed"):
        _outcomes[broker][report.outcome] += 1


def pytest_terminal_summary(terminalreporter):
    for broker, counts in sorted(_outcomes.items()):
        name = {**BROKER_NAMES, "external": EXTERNAL_BROKER}[broker]
        ran = counts["passed"] + counts["failed"]
        terminalreporter.write_line(
            f"broker tests on {name}: {ran} run ({counts['passed']} passed, {counts['failed']} failed), "
            f"{counts['skipped']} skipped"
        )


@pytest.fixture
def pipeline_cfg(kafka_bootstrap, tmp_path):
    """The pipeline config on the test broker, with this test's own topics, groups and checkpoint folder."""
    from pipeline_support import isolated_config

    return isolated_config(kafka_bootstrap, tmp_path)
