"""Faults on Apache Kafka: compaction of the code and model stores, the broker killed and restarted
mid-replay (both Apache Kafka only: tansu neither compacts nor keeps anything across a restart), and an
encoder joining and leaving mid-stream (both brokers).

"Doubled" means a key with two different codes; the same code written twice (a batch re-read after a
fault, at-least-once) is harmless, since every store keeps one record per key.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest
from pipeline_support import (
    Replayer,
    RoleThread,
    codes_of,
    conflicting,
    fresh_metrics,
    isolated_config,
    keys_of,
    model_state,
    paired_items,
    produce_arrivals,
    publish,
    read_all,
    read_codes_until,
    read_topic,
    serving,
    wait_for_store,
    wait_until,
)

from consumers import settings
from consumers.brokers.apache_kafka import ApacheKafkaBroker
from consumers.encoder.role import run_encoder
from consumers.models import ModelFollower
from consumers.processes import RoleProcess
from consumers.query.role import CodeStore, QueryClient
from consumers.runtime import Runtime
from fpocmh_core import schemas
from fpocmh_core.protocols import p1_chunk_records
from fpocmh_core.records import Modality

pytestmark = pytest.mark.broker

# Segments roll after 100 ms and are cleaned as soon as 1% of them is dirty, tombstones kept 100 ms.
FAST_COMPACTION = (
    "{segment.ms: 100, min.cleanable.dirty.ratio: 0.01, delete.retention.ms: 100, min.compaction.lag.ms: 0}"
)


def topic_when(cfg, topic: str, done, what: str, timeout_s: float = 60.0) -> list:
    """Everything on ``topic`` once ``done(record count)`` holds."""
    got: list = []

    def check() -> bool:
        got[:] = read_all(cfg, topic)
        return done(len(got))

    wait_until(check, timeout_s, what)
    return got


def store_of(cfg, codes: list[schemas.CodeMessage]) -> dict[Modality, dict[int, bytes]]:
    store = CodeStore(cfg.bits)
    store.upsert_messages(codes)
    out = {}
    for modality in Modality:
        ids, packed = store.codes(modality)
        out[modality] = {int(i): row.tobytes() for i, row in zip(ids, packed, strict=True)}
    return out


@pytest.mark.requires_kafka("compaction")
def test_compaction_keeps_one_record_per_code_and_model_part_and_a_rebuilt_store_equals_the_history(
    kafka_bootstrap, tmp_path, mirflickr
):
    sets = [f"topic_config.codes={FAST_COMPACTION}", f"topic_config.models={FAST_COMPACTION}", "partitions.codes=1"]
    cfg = isolated_config(kafka_bootstrap, tmp_path, sets)
    versions = [model_state(mirflickr.dims, cfg.bits, version=v, seed=v) for v in range(3)]
    for state in versions:
        publish(cfg, state)
    records = paired_items(mirflickr.image, mirflickr.text, range(300))
    keys = keys_of(records)
    with RoleThread(run_encoder, cfg):
        # The same items twice, as after a replay: every key gets a second record.
        produce_arrivals(cfg, records)
        read_codes_until(cfg, keys)
        produce_arrivals(cfg, records)
        history = topic_when(cfg, cfg.topics.codes, lambda n: n >= 2 * len(keys), "every key coded twice")
    codes_history = codes_of(history)
    assert len(codes_history) == 2 * len(keys)

    # The cleaner never touches the active segment: one more record after segment.ms closes the last one.
    time.sleep(0.2)
    rt = Runtime(cfg, "test", fresh_metrics())
    last = history[-1]
    rt.produce(cfg.topics.codes, last.value(), key=last.key(), headers=last.headers())
    rt.flush()
    publish(cfg, versions[-1])
    compacted = topic_when(cfg, cfg.topics.codes, lambda n: n <= len(keys) + 1, "codes compacted to one per key")
    models = topic_when(cfg, cfg.topics.models, lambda n: n <= 2, "models compacted to the newest part")

    codes_compacted = codes_of(compacted)
    assert {c.key for c in codes_compacted} == keys
    assert store_of(cfg, codes_compacted) == store_of(cfg, codes_history)
    assert all(len(m) == len(records) for m in store_of(cfg, codes_compacted).values())
    assert {schemas.decode_model_part(m.value(), m.headers()).version for m in models} == {2}
    follower = ModelFollower(Runtime(cfg, "test", fresh_metrics()))
    try:
        newest = follower.wait_first(threading.Event(), timeout_s=30)
    finally:
        follower.close()
    assert newest is not None and newest.version == 2, "a reader started after compaction gets the newest version"


@pytest.mark.apache_kafka
def test_the_broker_killed_and_restarted_mid_replay_loses_no_acknowledged_arrival(tmp_path, mirflickr, p1, p1_config):
    records = p1_chunk_records(mirflickr, p1, p1_config, 1)
    broker = ApacheKafkaBroker(log_path=tmp_path / "kafka.log", log_dir=tmp_path / "kraft")
    with broker as bootstrap:
        cfg = isolated_config(bootstrap, tmp_path)
        publish(cfg, model_state(mirflickr.dims, cfg.bits))
        config_path = settings.dump(cfg, tmp_path / "pipeline.yaml")
        roles = [
            RoleProcess(name, config_path, tmp_path / f"{name}.log").start() for name in ("encode", "serve-queries")
        ]
        replayer = Replayer(cfg, records, rate=300)
        try:
            with QueryClient(cfg) as client:
                wait_until(lambda: serving(client), timeout_s=120, what="the query consumer serving")
            replayer.start()
            # Mid-replay: the encoder has been coding for a while and two thirds of the stream are still to come.
            wait_until(lambda: replayer.sent >= len(records) // 3, what="a third of the replay")
            read_topic(cfg, cfg.topics.codes, 100)
            broker.kill()
            time.sleep(1.0)
            broker.restart()
            replayer.join(180)
            assert not replayer.is_alive()
            acked = {r for r in records if r.item_id in replayer.acked}
            assert len(acked) > len(records) // 2, f"only {len(acked)} of {len(records)} arrivals acknowledged"
            stored = read_codes_until(cfg, keys_of(acked), timeout_s=120)
            for role in roles:
                role.check_alive()
            wait_for_store(cfg, len(keys_of(acked)))
        finally:
            exits = [role.stop() for role in roles]
    assert conflicting(stored) == []
    assert exits == [0, 0], "both roles stopped cleanly after carrying on through the outage"


def test_a_second_encoder_joining_and_leaving_mid_stream_loses_nothing_and_doubles_nothing(
    pipeline_cfg, mirflickr, p1, p1_config
):
    # Small batches: many commits, so the rebalances land between batches of a running stream.
    cfg = dataclasses.replace(pipeline_cfg, encoder=dataclasses.replace(pipeline_cfg.encoder, batch_size=20))
    publish(cfg, model_state(mirflickr.dims, cfg.bits))
    records = [r for c in (1, 2) for r in p1_chunk_records(mirflickr, p1, p1_config, c)]
    third = len(records) // 3
    before, during, after = records[:third], records[third : 2 * third], records[2 * third :]
    topic = cfg.topics.codes
    with RoleThread(run_encoder, cfg) as first:
        produce_arrivals(cfg, before)
        read_codes_until(cfg, keys_of(before))
        with RoleThread(run_encoder, cfg) as second:
            pending = list(during)

            def second_is_coding() -> bool:
                # Arrivals keep coming until the second encoder has its share of partitions and codes some.
                if second.value("fpocmh_messages_produced_total", role="encoder", topic=topic) > 0:
                    return True
                batch, pending[:] = pending[:20], pending[20:]
                if batch:
                    produce_arrivals(cfg, batch)
                return False

            wait_until(second_is_coding, timeout_s=90, what="the second encoder coding arrivals")
            produce_arrivals(cfg, pending)
        first_before_leave = first.value("fpocmh_messages_produced_total", role="encoder", topic=topic)
        produce_arrivals(cfg, after)
        stored = read_codes_until(cfg, keys_of(records), timeout_s=120)
        first_after_leave = first.value("fpocmh_messages_produced_total", role="encoder", topic=topic)
    assert second.value("fpocmh_messages_produced_total", role="encoder", topic=topic) > 0
    assert first_after_leave > first_before_leave, "the first encoder took the partitions back"
    assert {c.key for c in stored} == keys_of(records), "nothing lost"
    assert conflicting(stored) == [], "nothing doubled"
