"""The encoder and query roles against a real broker: codes once per key, answers equal to in-process
search, model hot swap, dead letters."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from pipeline_support import (
    RoleThread,
    codes_of,
    committed_total,
    model_state,
    paired_items,
    produce_arrivals,
    produce_raw,
    publish,
    read_topic,
    wait_until,
)

from consumers.encoder.role import run_encoder
from consumers.query.role import Query, QueryClient, run_query
from fpocmh_core import codes as codes_mod
from fpocmh_core import schemas
from fpocmh_core.learners.base import model_from_state
from fpocmh_core.protocols import p1_chunk_records
from fpocmh_core.records import Modality
from producers.replay import RateReport, Replayer, expected_codes, wait_for_store, wire_dtypes

pytestmark = pytest.mark.broker


@pytest.fixture(scope="module")
def stream_slice(mirflickr, p1, p1_config):
    """300 partial-modal arrivals of P1's first chunk, after 50 paired offline items."""
    offline = paired_items(mirflickr.image, mirflickr.text, p1.offline[:50], chunk=-1)
    return offline + p1_chunk_records(mirflickr, p1, p1_config, 0)[:300]


def expected_keys(records):
    return {schemas.code_key(r.item_id, m) for r in records for m in r.modalities}


def test_replayed_slice_is_coded_once_per_key_and_queries_match_in_process_search(
    pipeline_cfg, mirflickr, p1, stream_slice
):
    state = model_state(mirflickr.dims, pipeline_cfg.bits)
    publish(pipeline_cfg, state)
    keys = expected_keys(stream_slice)
    with RoleThread(run_encoder, pipeline_cfg), RoleThread(run_query, pipeline_cfg) as query:
        replayer = Replayer(pipeline_cfg, query.metrics, wire_dtypes(mirflickr), rate=2000)
        assert replayer.send(stream_slice) == len(stream_slice)
        replayer.close()
        stored = codes_of(read_topic(pipeline_cfg, pipeline_cfg.topics.codes, len(keys)))
        with QueryClient(pipeline_cfg) as client:
            status = wait_for_store(client, expected_codes([stream_slice]), timeout_s=60)
            queries = p1.query[:4]
            answers = {
                m: client.search(Query((mirflickr.image if m is Modality.IMAGE else mirflickr.text)[queries], m, k=25))
                for m in Modality
            }

    assert sorted(c.key for c in stored) == sorted(keys), "every (item, modality) coded exactly once"
    assert status.store_codes == expected_codes([stream_slice]), "the store holds each key once"
    assert {c.model_version for c in stored} == {0}
    model = model_from_state(state)
    for m in Modality:
        feats = mirflickr.image if m is Modality.IMAGE else mirflickr.text
        q = model.encode(feats[queries], m)
        db = [c for c in stored if c.modality is m.other]
        db_ids = np.array([c.item_id for c in db])
        dist = codes_mod.hamming(q, np.stack([c.code for c in db]))
        answer = answers[m]
        assert answer.model_version == 0
        assert answer.ids.shape == (queries.size, 25)
        # Same distances in the same order; ties may list different items, but each listed item
        # must sit at exactly the distance reported for it.
        np.testing.assert_array_equal(answer.distances, np.sort(dist, axis=1)[:, :25])
        for row in range(queries.size):
            position = {int(i): j for j, i in enumerate(db_ids)}
            listed = [dist[row, position[int(i)]] for i in answer.ids[row]]
            np.testing.assert_array_equal(listed, answer.distances[row])


def test_encoder_switches_to_a_newer_model_version_without_stopping(pipeline_cfg, mirflickr, stream_slice):
    v0 = model_state(mirflickr.dims, pipeline_cfg.bits, version=0, seed=0)
    v1 = model_state(mirflickr.dims, pipeline_cfg.bits, version=1, seed=1)
    first, later = stream_slice[:100], stream_slice[100:200]
    n_first, n_later = len(expected_keys(first)), len(expected_keys(later))
    publish(pipeline_cfg, v0)
    with RoleThread(run_encoder, pipeline_cfg) as encoder:
        produce_arrivals(pipeline_cfg, first)
        read_topic(pipeline_cfg, pipeline_cfg.topics.codes, n_first)
        publish(pipeline_cfg, v1)
        wait_until(lambda: encoder.value("fpocmh_model_version", role="encoder") == 1, what="encoder on version 1")
        produce_arrivals(pipeline_cfg, later)
        everything = codes_of(read_topic(pipeline_cfg, pipeline_cfg.topics.codes, n_first + n_later))

    assert sorted(c.key for c in everything) == sorted(expected_keys(first) | expected_keys(later))
    late = [c for c in everything if c.key in expected_keys(later)]
    assert {c.model_version for c in everything if c.key in expected_keys(first)} == {0}
    assert {c.model_version for c in late} == {1}
    v1_model = model_from_state(v1)
    by_key = {schemas.code_key(r.item_id, m): r.features(m) for r in later for m in r.modalities}
    for c in late:
        feats = by_key[c.key]
        np.testing.assert_array_equal(c.code, v1_model.encode(feats[None, :], c.modality)[0])


def test_malformed_arrivals_go_to_dead_letters_and_the_encoder_keeps_going(pipeline_cfg, mirflickr, stream_slice):
    publish(pipeline_cfg, model_state(mirflickr.dims, pipeline_cfg.bits))
    topic = pipeline_cfg.topics.arrivals
    wrong_dims = stream_slice[60].__class__(7, np.zeros(5, np.float32), None)
    with RoleThread(run_encoder, pipeline_cfg) as encoder:
        produce_raw(pipeline_cfg, topic, b"\x00garbage", schemas.ARRIVAL_HEADERS)
        produce_raw(pipeline_cfg, topic, b"no headers at all", None)
        produce_arrivals(pipeline_cfg, [wrong_dims])
        produce_arrivals(pipeline_cfg, stream_slice[:40])
        codes = read_topic(pipeline_cfg, pipeline_cfg.topics.codes, len(expected_keys(stream_slice[:40])))
        dead = read_topic(pipeline_cfg, pipeline_cfg.topics.dead_letters, 3)
        assert encoder.value("fpocmh_dead_letters_total", role="encoder", reason="decode") == 1

    assert len(codes) == len(expected_keys(stream_slice[:40]))
    reasons = sorted(schemas.header(m.headers(), schemas.DLQ_REASON) for m in dead)
    assert reasons == [b"decode", b"schema", b"shape"]
    for msg in dead:
        assert schemas.header(msg.headers(), schemas.DLQ_TOPIC) == topic.encode()
        assert int(schemas.header(msg.headers(), schemas.DLQ_OFFSET)) >= 0
        assert int(schemas.header(msg.headers(), schemas.DLQ_PARTITION)) >= 0
        assert schemas.header(msg.headers(), schemas.DLQ_DETAIL)
    garbage = next(m for m in dead if schemas.header(m.headers(), schemas.DLQ_REASON) == b"decode")
    assert garbage.value() == b"\x00garbage", "the dead letter keeps the original bytes"


def test_the_rate_report_measures_every_full_minute_against_the_target():
    report = RateReport(target=1000.0)
    for _ in range(130):  # 130 s of sending in 1 s steps, the second minute 10% slow
        report.add(1000 if len(report.windows) != 1 else 900, 1.0)
    assert report.items == 60_000 + 54_000 + 10_000
    assert [n for n, _s in report.windows] == [60_000, 54_000]
    assert report.worst_window_error == pytest.approx(0.10)
    assert "2 full minute(s) off by 10.0%" in report.summary()


def test_bad_queries_are_refused_or_dead_lettered_and_the_query_role_keeps_serving(pipeline_cfg, mirflickr):
    publish(pipeline_cfg, model_state(mirflickr.dims, pipeline_cfg.bits))
    lost = schemas.QueryRequest("lost", "no-such-topic", Modality.IMAGE, mirflickr.image[:1], 5, Modality.TEXT)
    with RoleThread(run_query, pipeline_cfg), QueryClient(pipeline_cfg) as client:
        client.status(timeout_s=60)
        (wrong_dims,) = client.search_many([Query(np.zeros(5, np.float32), Modality.IMAGE, 10)])
        produce_raw(pipeline_cfg, pipeline_cfg.topics.queries, *schemas.encode_query(lost))
        produce_raw(pipeline_cfg, pipeline_cfg.topics.queries, b"junk", schemas.QUERY_HEADERS)
        answer = client.search(Query(mirflickr.image[0], Modality.IMAGE, 5))
        dead = read_topic(pipeline_cfg, pipeline_cfg.topics.dead_letters, 3)

    assert wrong_dims.status == "bad_request" and "dims" in wrong_dims.error
    assert answer.status == "ok" and answer.ids.shape == (1, 0), "an empty store answers with no items"
    details = sorted(schemas.header(m.headers(), schemas.DLQ_DETAIL).decode() for m in dead)
    assert any("dims" in d for d in details)
    assert any("no-such-topic" in d for d in details)
    assert all(schemas.header(m.headers(), schemas.DLQ_ROLE) == b"query" for m in dead)


def test_the_query_role_commits_answered_requests_on_its_interval_and_at_stop(pipeline_cfg, mirflickr):
    cfg = dataclasses.replace(pipeline_cfg, query=dataclasses.replace(pipeline_cfg.query, commit_every_s=3600.0))
    publish(cfg, model_state(mirflickr.dims, cfg.bits))
    with RoleThread(run_query, cfg):
        with QueryClient(cfg) as client:
            client.status(timeout_s=60)
            client.search_many([Query(mirflickr.image[i], Modality.IMAGE, 5) for i in range(3)])
        held_back = committed_total(cfg, cfg.query.group, cfg.topics.queries)
    stopped = committed_total(cfg, cfg.query.group, cfg.topics.queries)

    assert held_back == 0, "within the interval no answered request is committed"
    assert stopped == 4, "stopping commits every answered request (a status probe and three searches)"
