"""The sharded query tier against a real broker: merged shard answers equal one store's, snapshots
restore exactly what a fresh read holds, consistency bounds, silent shards, a reset codes topic."""

from __future__ import annotations

import dataclasses
import functools
import threading

import numpy as np
import pytest
from confluent_kafka.admin import AdminClient
from pipeline_support import (
    RoleThread,
    fresh_metrics,
    model_state,
    produce_raw,
    publish,
    read_all,
    read_topic,
    wait_until,
)

from consumers.kafka import admin_config, ensure_topics, make_producer
from consumers.models import ModelFollower
from consumers.query import code_log
from consumers.query.client import Query, QueryClient, SessionOffsets
from consumers.query.role import QueryService, run_query
from consumers.query.shards import ShardSpec
from consumers.query.store import CodeStore
from consumers.runtime import Runtime
from fpocmh_core import schemas
from fpocmh_core.hamming import mih as mih_module
from fpocmh_core.learners.base import model_from_state
from fpocmh_core.records import Modality

pytestmark = pytest.mark.broker

TWO = (ShardSpec(0, 2), ShardSpec(1, 2))


@pytest.fixture
def cfg(pipeline_cfg, tmp_path):
    """Snapshots after every 200 codes, so a short test writes some."""
    query = dataclasses.replace(
        pipeline_cfg.query, snapshot_dir=str(tmp_path / "snapshots"), snapshot_every_codes=200, max_wait_s=10.0
    )
    return dataclasses.replace(pipeline_cfg, query=query)


@pytest.fixture
def model(cfg, mirflickr):
    state = model_state(mirflickr.dims, cfg.bits)
    publish(cfg, state)
    return model_from_state(state)


def produce_codes(cfg, model, ds, rows, session=None, version=0, producer=None) -> dict[int, np.ndarray]:
    """Text codes of dataset ``rows`` (item id = row) on the codes topic; {item: code}."""
    packed = model.encode(ds.text[rows], Modality.TEXT)
    # A session learns its offsets from the delivery reports of its writes.
    props = {"delivery.report.only.error": False, "on_delivery": session.on_delivery} if session else {}
    producer = producer or make_producer(cfg, "test", **props)
    for row, code in zip(rows, packed, strict=True):
        msg = schemas.CodeMessage(int(row), Modality.TEXT, code, version, (Modality.TEXT,))
        producer.produce(cfg.topics.codes, schemas.encode_code(msg), key=msg.key, headers=schemas.CODE_HEADERS)
    assert producer.flush(30) == 0
    return {int(r): c for r, c in zip(rows, packed, strict=True)}


def single_store_answer(model, ds, stored, query_rows, k):
    store = CodeStore(64)
    ids = np.array(sorted(stored))
    store.upsert(ids, np.stack([stored[i] for i in ids]), Modality.TEXT)
    return store.search(model.encode(ds.image[query_rows], Modality.IMAGE), Modality.TEXT, k)


def status_holding(client, n):
    """The status if some shard answers within 3 s and the store holds ``n`` text codes, else None."""
    try:
        status = client.status(timeout_s=3)
    except TimeoutError:
        return None
    return status if status.store_codes[1] >= n else None


def wait_for_codes(client, n, timeout_s=60):
    return wait_until(lambda: status_holding(client, n), timeout_s, f"{n} codes")


def test_two_shards_answer_exactly_what_one_store_answers_ties_included(cfg, model, mirflickr):
    stored = produce_codes(cfg, model, mirflickr, np.arange(1500))
    queries = np.arange(5000, 5006)
    with RoleThread(run_query, cfg, shard=TWO[0]), RoleThread(run_query, cfg, shard=TWO[1]):
        with QueryClient(cfg) as client:
            status = wait_for_codes(client, len(stored))
            answers = [client.search(Query(mirflickr.image[queries], Modality.IMAGE, k)) for k in (10, 100, 1400)]

    assert status.shard_count == 2 and status.store_codes == (0, 1500)
    assert [p for p, _o in status.offsets] == list(range(cfg.partitions.codes)), "every partition reported once"
    assert sum(o for _p, o in status.offsets) == 1500
    for answer, k in zip(answers, (10, 100, 1400), strict=True):
        dist, ids = single_store_answer(model, mirflickr, stored, queries, k)
        assert answer.status == "ok" and answer.shard_count == 2
        np.testing.assert_array_equal(answer.distances, dist)
        np.testing.assert_array_equal(answer.ids, ids)
        assert len(set(answer.distances[:, -1].tolist())) < k, "the cut at k falls inside a tie somewhere"


def test_each_shard_answers_a_request_on_its_own_partition_of_the_results_topic(cfg, model, mirflickr):
    """tansu stalls readers of a partition that takes concurrent appends, and every shard answers at once."""
    produce_codes(cfg, model, mirflickr, np.arange(200))
    last = cfg.partitions.results - 1
    with RoleThread(run_query, cfg, shard=TWO[0]), RoleThread(run_query, cfg, shard=TWO[1]):
        with QueryClient(cfg, reply_partition=last) as client:
            wait_for_codes(client, 200)
            cid = client.send(Query(mirflickr.image[0], Modality.IMAGE, 10))
            (answer,) = client.collect([cid])

    assert answer.status == "ok" and answer.shard_count == 2
    replies = [m for m in read_all(cfg, cfg.topics.results) if m.key() == cid.encode()]
    shard_of = {m.partition(): schemas.decode_result(m.value(), m.headers()).shard for m in replies}
    assert len(replies) == 2 and shard_of == {last: 0, 0: 1}, "shard s on the asked partition + s, wrapping round"


def service(cfg, shard, stop):
    rt = Runtime(cfg, "query", fresh_metrics(), stop)
    models = ModelFollower(rt)
    first = models.wait_first(stop, timeout_s=30)
    svc = QueryService(rt, models, first, shard, shard.owns(range(cfg.partitions.codes)))
    assert svc.catch_up(stop)
    return svc, models


def test_a_shard_restarted_from_its_snapshot_holds_exactly_what_a_fresh_read_holds(cfg, model, mirflickr):
    stop = threading.Event()
    produce_codes(cfg, model, mirflickr, np.arange(800))
    first, models = service(cfg, TWO[1], stop)
    first.snapshot()
    snapshot_codes = first.store.counts
    first.close()
    models.close()
    # The tail: new items and new codes for old ones (a later model version).
    produce_codes(cfg, model, mirflickr, np.arange(800, 1100))
    produce_codes(cfg, model_from_state(model_state(mirflickr.dims, 64, seed=9)), mirflickr, np.arange(0, 40), None, 1)

    restarted, models_r = service(cfg, TWO[1], stop)
    fresh, models_f = service(
        dataclasses.replace(cfg, query=dataclasses.replace(cfg.query, snapshot_dir="")), TWO[1], stop
    )
    try:
        tail_read = restarted.rt.metrics.registry.get_sample_value(
            "fpocmh_messages_consumed_total", {"role": "query", "topic": cfg.topics.codes}
        )
        assert snapshot_codes[1] > 0 and restarted.store.counts == fresh.store.counts
        for m in Modality:
            for a, b in zip(restarted.store.codes(m), fresh.store.codes(m), strict=True):
                np.testing.assert_array_equal(a, b)
        assert restarted.codes.offsets() == fresh.codes.offsets()
        assert restarted.model_versions == fresh.model_versions == {0, 1}
        assert tail_read < 340 + 1, "the restarted shard read only the tail of its partitions"
    finally:
        for svc, follower in ((restarted, models_r), (fresh, models_f)):
            svc.close()
            follower.close()


def test_a_multi_index_shard_restarted_from_its_snapshot_answers_what_one_flat_store_answers(
    cfg, model, mirflickr, monkeypatch
):
    """A short tail and small tables, so that a few thousand codes make segments with tables however
    the shard's reads batch them; the snapshot keeps them."""
    monkeypatch.setattr(mih_module, "TAIL_ROWS", 1024)
    monkeypatch.setattr(mih_module, "MIN_TABLE_ROWS", 1024)
    stop = threading.Event()
    stored = produce_codes(cfg, model, mirflickr, np.arange(5000))
    mih = dataclasses.replace(cfg, query=dataclasses.replace(cfg.query, index="mih"))
    first, models = service(mih, ShardSpec(0, 1), stop)
    first.snapshot()
    first.close()
    models.close()
    svc, models = service(mih, ShardSpec(0, 1), stop)
    queries = np.arange(10_000, 10_005)
    try:
        request = functools.partial(schemas.QueryRequest, "c", cfg.topics.results, Modality.IMAGE)
        answers = {k: svc.answer(request(mirflickr.image[queries], k, Modality.TEXT)) for k in (10, 500)}
        samples = svc.rt.metrics.registry.get_sample_value
        tag = {"shard": "all"}
        kind = samples("fpocmh_store_index_info", {**tag, "kind": "mih"})
        table_bytes = samples("fpocmh_store_index_table_bytes", {**tag, "modality": Modality.TEXT.short})
        probed = samples("fpocmh_query_index_probes_count", tag)
        probes = samples("fpocmh_query_index_probes_sum", tag)
        compared = samples("fpocmh_query_index_candidates_sum", tag)
        hashed = samples("fpocmh_query_hash_seconds_count", tag)
        searched = samples("fpocmh_query_index_search_seconds_count", tag)
    finally:
        svc.close()
        models.close()

    for k, answer in answers.items():
        dist, ids = single_store_answer(model, mirflickr, stored, queries, k)
        assert answer.status == "ok"
        np.testing.assert_array_equal(answer.distances, dist)
        np.testing.assert_array_equal(answer.ids, ids)
    assert kind == 1 and table_bytes > 0, "the restarted shard holds the tables"
    assert probed == 2 * len(queries), "one observation per query"
    assert probes > 0 and compared > 0, "the tables were probed"
    assert hashed == searched == len(answers), "hashing and index search timed apart, once per request"
    assert all(0 < a.hash_seconds < a.search_seconds for a in answers.values())


def test_session_consistency_sees_a_code_written_just_before_the_request(cfg, model, mirflickr):
    produce_codes(cfg, model, mirflickr, np.arange(300))
    with RoleThread(run_query, cfg, shard=TWO[0]), RoleThread(run_query, cfg, shard=TWO[1]):
        with QueryClient(cfg) as client:
            wait_for_codes(client, 300)
            session = SessionOffsets(cfg.topics.codes)
            produce_codes(cfg, model, mirflickr, np.array([9001]), session)
            seen = client.search(Query(mirflickr.image[0], Modality.IMAGE, 400), consistency="session", session=session)
            later = SessionOffsets(cfg.topics.codes)
            produce_codes(cfg, model, mirflickr, np.array([9002]), later)
            eventual = client.search(Query(mirflickr.image[0], Modality.IMAGE, 400))

    assert 9001 in seen.ids[0].tolist()
    reflected = dict(seen.offsets)
    assert all(reflected[p] >= o for p, o in session.bound())
    # Eventual reads wait for nothing: the item may be missing, but then the answer says it is behind.
    ((partition, bound),) = later.bound()
    assert 9002 in eventual.ids[0].tolist() or dict(eventual.offsets)[partition] < bound


def test_a_silent_shard_yields_a_partial_answer_or_an_error_as_configured(cfg, model, mirflickr):
    stored = produce_codes(cfg, model, mirflickr, np.arange(400))
    with RoleThread(run_query, cfg, shard=TWO[0]):
        with QueryClient(cfg, missing_shards="partial") as partial_client:
            wait_for_codes(partial_client, 1)
            partial = partial_client.search(Query(mirflickr.image[0], Modality.IMAGE, 1000), timeout_s=3)
        with QueryClient(cfg, missing_shards="error") as strict_client, pytest.raises(TimeoutError, match=r"\[1\]"):
            strict_client.search(Query(mirflickr.image[0], Modality.IMAGE, 10), timeout_s=3)

    assert partial.status == "partial" and "shard(s) 1 of 2" in partial.error
    owned = {int(i) for i in partial.ids[0]}
    assert owned and owned < set(stored), "only shard 0's items"
    assert {p for p, _o in partial.offsets} == set(TWO[0].owns(range(cfg.partitions.codes)))


def test_unreadable_code_records_are_dead_lettered_and_the_rest_stored(cfg, model, mirflickr):
    produce_codes(cfg, model, mirflickr, np.arange(100))
    produce_raw(cfg, cfg.topics.codes, b"\x00garbage", schemas.CODE_HEADERS)
    short = schemas.CodeMessage(7777, Modality.TEXT, np.zeros(4, np.uint8), 0, (Modality.TEXT,))
    produce_raw(cfg, cfg.topics.codes, schemas.encode_code(short), schemas.CODE_HEADERS)
    produce_codes(cfg, model, mirflickr, np.arange(100, 150))
    with RoleThread(run_query, cfg), QueryClient(cfg) as client:
        status = wait_for_codes(client, 150)
        dead = read_topic(cfg, cfg.topics.dead_letters, 2)
    assert status.store_codes == (0, 150)
    reasons = sorted(schemas.header(m.headers(), schemas.DLQ_REASON) for m in dead)
    assert reasons == [b"decode", b"shape"], "garbage, and a 32-bit code in a 64-bit store"


def test_queries_with_non_finite_features_are_refused_unhashed(cfg, model, mirflickr):
    bad = mirflickr.image[0].copy()
    bad[3] = np.nan
    with RoleThread(run_query, cfg) as role, QueryClient(cfg) as client:
        client.status(timeout_s=60)
        (answer,) = client.search_many([Query(bad, Modality.IMAGE, 5)])
        dead = read_topic(cfg, cfg.topics.dead_letters, 1)
        assert role.value("fpocmh_query_answers_total", role="query", status="bad_request") == 1
    assert answer.status == "bad_request" and "non-finite" in answer.error
    assert schemas.header(dead[0].headers(), schemas.DLQ_REASON) == b"invalid"


def test_a_shard_whose_codes_topic_was_recreated_rebuilds_instead_of_serving_lost_codes(
    cfg, model, mirflickr, monkeypatch
):
    monkeypatch.setattr(code_log, "STUCK_S", 1.0)
    produce_codes(cfg, model, mirflickr, np.arange(600))
    with RoleThread(run_query, cfg), QueryClient(cfg) as client:
        wait_for_codes(client, 600)
    admin = AdminClient(admin_config(cfg))
    admin.delete_topics([cfg.topics.codes])[cfg.topics.codes].result(30)
    wait_until(lambda: cfg.topics.codes not in admin.list_topics(timeout=10).topics, 30, "topic deleted")
    ensure_topics(cfg)
    produce_codes(cfg, model, mirflickr, np.arange(5000, 5050))
    with RoleThread(run_query, cfg) as role, QueryClient(cfg) as client:
        status = wait_for_codes(client, 50)
        rebuilds = role.value("fpocmh_store_rebuilds_total", shard="all")
    assert status.store_codes == (0, 50), "only the codes the recreated topic holds"
    assert rebuilds == 1


@pytest.mark.requires_kafka("watermarks")
def test_strong_consistency_sees_every_code_on_the_topic_when_the_request_is_sent(cfg, model, mirflickr):
    produce_codes(cfg, model, mirflickr, np.arange(200))
    with RoleThread(run_query, cfg), QueryClient(cfg) as client:
        wait_for_codes(client, 200)
        produce_codes(cfg, model, mirflickr, np.arange(200, 260))
        answer = client.search(Query(mirflickr.image[0], Modality.IMAGE, 1000), consistency="strong")
    assert set(range(260)) == set(answer.ids[0].tolist())


@pytest.mark.requires_kafka("transactions")
def test_where_the_encoder_writes_in_transactions_a_shard_never_serves_a_code_of_an_aborted_batch(
    cfg, model, mirflickr
):
    produce_codes(cfg, model, mirflickr, np.arange(100))
    encoder = make_producer(cfg, "test", **{"transactional.id": "test-aborted-batch"})
    encoder.init_transactions(30)
    for rows, end in (
        (np.arange(8000, 8020), encoder.abort_transaction),
        (np.arange(9000, 9005), encoder.commit_transaction),
    ):
        encoder.begin_transaction()
        produce_codes(cfg, model, mirflickr, rows, producer=encoder)
        end(30)
    with RoleThread(run_query, cfg), QueryClient(cfg) as client:
        wait_for_codes(client, 105)
        answer = client.search(Query(mirflickr.image[0], Modality.IMAGE, 1000), consistency="strong")
    assert set(answer.ids[0].tolist()) == set(range(100)) | set(range(9000, 9005)), "the aborted batch is not served"
