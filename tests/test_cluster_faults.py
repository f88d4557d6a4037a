"""Faults on a three-broker Apache Kafka cluster: KRaft, every node a broker and a controller, the pipeline's
topics with three replicas and ``min.insync.replicas`` 2, every producer ``acks=all`` (docs/cluster.md).

A broker lost, for a while or for good, stops nothing and loses nothing; two lost (the controller quorum
with them) stop every write, acknowledged or not, until one returns. "Coded once" means one committed
code record per key: the encoder writes exactly once on Apache Kafka, and the test replay's producer is
idempotent, so a produce retried across a leader change adds no second arrival.

One cluster for the module, started once per test run (not per broker kind); each test gets it whole.
"""

from __future__ import annotations

import collections
import logging
import time

import pytest
from confluent_kafka import TopicCollection
from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType
from pipeline_support import (
    Replayer,
    RoleThread,
    conflicting,
    isolated_config,
    keys_of,
    model_state,
    produce_arrivals,
    publish,
    read_codes_until,
    read_topic,
    serving,
    wait_for_store,
    wait_until,
)

from consumers import settings
from consumers.brokers.cluster import KafkaCluster
from consumers.encoder.role import run_encoder
from consumers.kafka import admin_config
from consumers.processes import RoleProcess
from consumers.query.client import QueryClient
from fpocmh_core import schemas
from fpocmh_core.protocols import p1_chunk_records

pytestmark = [pytest.mark.broker, pytest.mark.kafka_cluster]

BROKERS = 3
# A retried produce (its leader gone before it answered) must not write the arrival twice.
IDEMPOTENT = {"enable.idempotence": True}
# How long two lost brokers are kept away: several times the fencing and the client's request timeouts
# (2 s, 30 s by default but answered at once by a refused connection), so a write that could be
# acknowledged without a quorum would have been.
QUORUM_LOST_S = 12.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    factor, in_sync = settings.load(environ={}).replication(BROKERS)
    folder = tmp_path_factory.mktemp("cluster")
    nodes = KafkaCluster(
        BROKERS,
        log_path=folder / "kafka.log",
        log_dir=folder / "data",
        replication_factor=factor,
        min_insync_replicas=in_sync,
    )
    with nodes:
        yield nodes


@pytest.fixture
def whole(cluster):
    """The cluster with every node up, before the test and after it (a test may leave nodes killed)."""
    cluster.wait_for_brokers(BROKERS)
    yield cluster
    for node_id, node in cluster.nodes.items():
        if node.proc is None:
            cluster.restart(node_id)
    cluster.wait_for_brokers(BROKERS)


def ids_of(records) -> set[int]:
    """The item ids of ``records`` (a split pair is two arrivals of one id), as the replayer acknowledges them."""
    return {r.item_id for r in records}


def codes_per_key(codes: list[schemas.CodeMessage]) -> collections.Counter[bytes]:
    return collections.Counter(c.key for c in codes)


def coded_twice(codes: list[schemas.CodeMessage]) -> list[bytes]:
    return [key for key, n in codes_per_key(codes).items() if n > 1]


def test_the_pipeline_topics_have_three_replicas_all_in_sync_and_need_two_for_a_write(whole, tmp_path):
    cfg = isolated_config(whole.bootstrap, tmp_path)
    admin = AdminClient(admin_config(cfg))
    meta = admin.list_topics(cfg.topics.codes, timeout=10).topics[cfg.topics.codes]
    assert {len(p.replicas) for p in meta.partitions.values()} == {3}
    assert {len(p.isrs) for p in meta.partitions.values()} == {3}
    resource = ConfigResource(ResourceType.TOPIC, cfg.topics.codes)
    described = admin.describe_configs([resource])[resource].result(10)
    assert described["min.insync.replicas"].value == "2"
    topics = admin.describe_topics(TopicCollection([cfg.topics.arrivals]))[cfg.topics.arrivals].result(10)
    assert {len(p.replicas) for p in topics.partitions} == {3}


def test_every_acknowledged_arrival_is_coded_once_when_the_codes_leader_is_killed_mid_replay_and_restarted(
    whole, tmp_path, mirflickr, p1, p1_config
):
    records = p1_chunk_records(mirflickr, p1, p1_config, 1)
    cfg = isolated_config(whole.bootstrap, tmp_path)
    publish(cfg, model_state(mirflickr.dims, cfg.bits))
    config_path = settings.dump(cfg, tmp_path / "pipeline.yaml")
    roles = [RoleProcess(name, config_path, tmp_path / f"{name}.log").start() for name in ("encode", "serve-queries")]
    # ~13 s of replay: a third before the kill, a third with the leader gone, a third after its return.
    replayer = Replayer(cfg, records, rate=150, **IDEMPOTENT)
    try:
        with QueryClient(cfg) as client:
            wait_until(lambda: serving(client), timeout_s=120, what="the query consumer serving")
        replayer.start()
        wait_until(lambda: replayer.sent >= len(records) // 3, what="a third of the replay")
        read_topic(cfg, cfg.topics.codes, 100)
        leader = whole.leader_of(cfg.topics.codes, 0)
        whole.kill(leader)
        wait_until(lambda: replayer.sent >= 2 * len(records) // 3, timeout_s=120, what="two thirds of the replay")
        whole.restart(leader)
        replayer.join(180)
        assert not replayer.is_alive()
        assert replayer.failed == 0 and replayer.acked == ids_of(records), "one broker down refuses no write"
        stored = read_codes_until(cfg, keys_of(records), timeout_s=120)
        for role in roles:
            role.check_alive()
        wait_for_store(cfg, len(keys_of(records)))
        # The roles saw the leader go and come back, and said so.
        wait_until(lambda: "all 3 brokers are back" in (tmp_path / "encode.log").read_text(), 30, "the return logged")
    finally:
        exits = [role.stop() for role in roles]
    assert {c.key for c in stored} == keys_of(records), "0 missing"
    assert conflicting(stored) == [] and coded_twice(stored) == [], "0 doubled: one committed code per key"
    for name in ("encode", "serve-queries"):
        text = (tmp_path / f"{name}.log").read_text()
        assert f"broker(s) [{leader}] gone from the cluster's metadata" in text, name
        assert "lost the broker" not in text, f"{name}: one broker of three gone is not the broker lost"
    assert exits == [0, 0], "both roles carried on through the outage and stopped cleanly"


def test_with_one_broker_lost_for_good_the_replay_completes_and_every_arrival_is_coded_once(
    whole, tmp_path, mirflickr, p1, p1_config, caplog
):
    caplog.set_level(logging.WARNING, logger="consumers.health")
    records = p1_chunk_records(mirflickr, p1, p1_config, 2)
    cfg = isolated_config(whole.bootstrap, tmp_path)
    publish(cfg, model_state(mirflickr.dims, cfg.bits))
    replayer = Replayer(cfg, records, rate=300, **IDEMPOTENT)
    with RoleThread(run_encoder, cfg) as encoder:
        wait_until(lambda: encoder.value("fpocmh_model_updates_total", role="encoder") == 1, what="the encoder ready")
        wait_until(lambda: encoder.value("fpocmh_brokers", role="encoder") == 3, 30, "three brokers shown")
        replayer.start()
        wait_until(lambda: replayer.sent >= len(records) // 4, what="a quarter of the replay")
        lost = whole.leader_of(cfg.topics.arrivals, 0)
        whole.kill(lost)
        wait_until(lambda: encoder.value("fpocmh_brokers", role="encoder") == 2, 30, "the lost broker shown")
        replayer.join(180)
        assert not replayer.is_alive()
        stored = read_codes_until(cfg, keys_of(records), timeout_s=120)
        assert encoder.value("fpocmh_brokers", role="encoder") == 2, "the outage shown for as long as it lasts"
    assert replayer.failed == 0 and replayer.acked == ids_of(records), "the replay completed"
    assert {c.key for c in stored} == keys_of(records), "0 missing"
    assert conflicting(stored) == [] and coded_twice(stored) == [], "0 doubled"
    lines = [r.getMessage() for r in caplog.records if r.name == "consumers.health"]
    assert any(f"broker(s) [{lost}] gone from the cluster's metadata (2 of 3 listed)" in line for line in lines)


def test_with_two_brokers_lost_no_write_is_acknowledged_and_the_pipeline_recovers_when_one_returns(
    whole, tmp_path, mirflickr, p1, p1_config
):
    records = p1_chunk_records(mirflickr, p1, p1_config, 0)[:600]
    before, during = records[:300], records[300:]
    cfg = isolated_config(whole.bootstrap, tmp_path)
    publish(cfg, model_state(mirflickr.dims, cfg.bits))
    with RoleThread(run_encoder, cfg) as encoder:
        produce_arrivals(cfg, before)
        read_codes_until(cfg, keys_of(before))
        survivor = whole.leader_of(cfg.topics.codes, 0)
        lost = [node for node in whole.nodes if node != survivor]
        for node in lost:
            whole.kill(node)
        replayer = Replayer(cfg, during, rate=1000, **IDEMPOTENT)
        replayer.start()
        time.sleep(QUORUM_LOST_S)
        assert replayer.sent == len(during), "the producer took every write (it queues them)"
        assert replayer.acked == set(), "no write acknowledged with one broker and no controller quorum"
        assert replayer.failed == 0, "none refused either: they wait for the cluster"
        assert encoder.error is None, "the encoder waits too"
        back = time.monotonic()
        whole.restart(lost[0])
        replayer.join(180)
        assert not replayer.is_alive()
        assert replayer.acked == ids_of(during), "every write acknowledged once two brokers are up"
        stored = read_codes_until(cfg, keys_of(records), timeout_s=180)
        recovered_s = time.monotonic() - back
    assert {c.key for c in stored} == keys_of(records), f"0 missing ({recovered_s:.0f} s after a broker returned)"
    assert conflicting(stored) == [] and coded_twice(stored) == [], "0 doubled"
