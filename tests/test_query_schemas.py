"""Query and result schema version 2 (consistency bound, shard tags, reflected offsets), the version-1
readers kept for old messages, and the bulk code decoder against the per-message one."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from fpocmh_core import schemas
from fpocmh_core.records import Modality

rng = np.random.default_rng(7)


def test_a_v2_request_carries_its_consistency_bound_and_wait():
    feats = rng.standard_normal((2, 16)).astype(np.float32)
    req = schemas.QueryRequest(
        "q1", "replies", Modality.TEXT, feats, 50, Modality.IMAGE, 1, min_offsets=((0, 12), (3, 40)), wait_ms=2500
    )
    body, headers = schemas.encode_query(req)
    assert schemas.header(headers, schemas.VERSION_HEADER) == b"2"
    back = schemas.decode_query(body, headers)
    assert (back.min_offsets, back.wait_ms, back.k, back.reply_partition) == (((0, 12), (3, 40)), 2500, 50, 1)
    np.testing.assert_array_equal(back.features, feats)


def test_a_v1_request_still_decodes_without_a_bound():
    head = struct.pack("<BBIi", 0, 1, 10, -1)
    body = head + b"\x02\x00id" + b"\x01\x00r" + schemas.encode_array(np.ones((1, 4), np.float32))
    back = schemas.decode_query(body, schemas.schema_headers(schemas.QUERY, 1))
    assert (back.correlation_id, back.k, back.min_offsets, back.wait_ms) == ("id", 10, (), 0)


def test_a_v2_result_carries_its_shard_and_the_offsets_it_reflects():
    ids, dist = rng.integers(0, 1000, (2, 5)), rng.integers(0, 64, (2, 5)).astype(np.int32)
    res = schemas.QueryResult("c", "behind", ids, dist, 3, (4, 5), 0.01, "late", 1, 4, ((1, 77), (5, 9)))
    back = schemas.decode_result(*schemas.encode_result(res))
    assert (back.status, back.shard, back.shard_count, back.offsets, back.error) == (
        "behind",
        1,
        4,
        ((1, 77), (5, 9)),
        "late",
    )
    np.testing.assert_array_equal(back.ids, ids)
    whole = schemas.decode_result(*schemas.encode_result(schemas.QueryResult("w", "ok", ids, dist, 0, (1, 1))))
    assert (whole.shard, whole.shard_count, whole.offsets) == (None, 1, ())


def test_a_v3_result_says_how_much_of_its_search_was_hashing_and_a_v2_one_reads_as_none():
    ids, dist = rng.integers(0, 1000, (1, 3)), rng.integers(0, 64, (1, 3)).astype(np.int32)
    res = schemas.QueryResult("c", "ok", ids, dist, 3, (4, 5), 0.004, "", 0, 2, ((0, 7),), hash_seconds=0.001)
    back = schemas.decode_result(*schemas.encode_result(res))
    assert (back.search_seconds, back.hash_seconds) == (pytest.approx(0.004), pytest.approx(0.001))
    head = struct.pack("<Bqqqfhh", 0, 3, 4, 5, 0.004, 0, 2)
    arrays = schemas.encode_array(ids.astype(np.int32)) + schemas.encode_array(dist.astype(np.uint8))
    offsets = schemas.encode_array(np.array([[0, 7]], np.int64))  # (partition, next offset) pairs
    v2 = schemas.decode_result(
        head + b"\x01\x00c\x00\x00" + arrays + offsets, schemas.schema_headers(schemas.RESULT, 2)
    )
    assert (v2.hash_seconds, v2.offsets, v2.shard) == (0.0, ((0, 7),), 0)


def test_a_v1_result_means_the_whole_store():
    head = struct.pack("<Bqqqf", 0, 2, 10, 20, 0.5)
    arrays = schemas.encode_array(np.array([[3, 1]], np.int32)) + schemas.encode_array(np.array([[0, 2]], np.uint8))
    back = schemas.decode_result(head + b"\x01\x00c" + b"\x00\x00" + arrays, schemas.schema_headers(schemas.RESULT, 1))
    assert (back.shard, back.shard_count, back.offsets, back.store_codes) == (None, 1, (), (10, 20))
    assert back.ids.tolist() == [[3, 1]]


def test_a_result_naming_a_shard_beyond_its_count_is_refused():
    res = schemas.QueryResult("c", "ok", np.zeros((1, 0)), np.zeros((1, 0)), 0, (0, 0), 0, "", 2, 2)
    with pytest.raises(schemas.SchemaError):
        schemas.decode_result(*schemas.encode_result(res))


def code(item, modality, bits=64, version=1):
    packed = rng.integers(0, 256, bits // 8, dtype=np.uint8)
    return schemas.CodeMessage(item, modality, packed, version, (modality,), "encoder")


def test_bulk_decoding_equals_message_by_message_decoding_and_names_the_rest():
    msgs = [code(i, Modality(i % 2)) for i in range(50)]
    values = [schemas.encode_code(m) for m in msgs]
    values[7] = values[7][:-1]  # truncated
    values[9] = schemas.encode_code(code(9, Modality.TEXT, bits=32))  # another code length
    values[11] = None  # a tombstone
    rows, rejected = schemas.decode_code_rows(values, 64)
    assert rejected.tolist() == [7, 9, 11]
    kept = [m for i, m in enumerate(msgs) if i not in (7, 9, 11)]
    assert rows["item_id"].tolist() == [m.item_id for m in kept]
    assert rows["modality"].tolist() == [int(m.modality) for m in kept]
    assert rows["model_version"].tolist() == [1] * len(kept)
    np.testing.assert_array_equal(rows["code"], np.stack([m.code for m in kept]))
