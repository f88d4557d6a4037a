"""Wire formats: round trips, compact encodings, malformed messages, model-update reassembly."""

from __future__ import annotations

import hashlib
import random
import struct

import numpy as np
import pytest

from fpocmh_core import schemas
from fpocmh_core.records import ItemRecord, Modality
from fpocmh_core.state import ModelState

rng = np.random.default_rng(0)
# An arrival's fixed head: item 1, chunk 0, then the flags byte.
HEAD = (1).to_bytes(8, "little") + (0).to_bytes(4, "little")


def test_arrivals_round_trip_paired_and_partial_with_their_labels(mirflickr):
    dtypes = schemas.WireDtypes(schemas.wire_dtype(mirflickr.image), schemas.wire_dtype(mirflickr.text))
    records = [
        ItemRecord(3, mirflickr.image[3], mirflickr.text[3], mirflickr.labels[3], chunk=-1),
        ItemRecord(4, mirflickr.image[4], None, None, chunk=2),
        ItemRecord(2**40, None, mirflickr.text[5], mirflickr.labels[5], chunk=9),
    ]
    for record in records:
        body, headers = schemas.encode_arrival(record, dtypes)
        back = schemas.decode_arrival(body, headers)
        assert (back.item_id, back.chunk, back.modalities) == (record.item_id, record.chunk, record.modalities)
        for m in record.modalities:
            np.testing.assert_array_equal(back.features(m), record.features(m))
        if record.labels is None:
            assert back.labels is None
        else:
            np.testing.assert_array_equal(back.labels, record.labels)


def test_wire_dtype_picks_the_most_compact_lossless_encoding(mirflickr):
    # The benchmark's text is a binary bag of words: 1,386 tags travel in 174 bytes.
    assert schemas.wire_dtype(mirflickr.text) == 255
    body, _ = schemas.encode_arrival(ItemRecord(1, None, mirflickr.text[0]), schemas.WireDtypes(text=255))
    assert len(body) < 200
    assert schemas.wire_dtype(np.array([0.0, 3.0, 200.0], np.float32)) == schemas.dtype_code(np.uint8)
    assert schemas.wire_dtype(np.array([0.5, 1.25], np.float32)) == schemas.dtype_code(np.float16)
    # MobileNet features are not exact in float16, so they stay float32.
    assert schemas.wire_dtype(mirflickr.image[:100]) == schemas.dtype_code(np.float32)


def test_code_messages_round_trip_with_key_per_item_and_modality():
    code = schemas.CodeMessage(12, Modality.TEXT, rng.integers(0, 256, 8, dtype=np.uint8), 5, (Modality.TEXT,))
    back = schemas.decode_code(schemas.encode_code(code), schemas.CODE_HEADERS)
    assert (back.item_id, back.modality, back.model_version, back.present, back.source, back.bits) == (
        12,
        Modality.TEXT,
        5,
        (Modality.TEXT,),
        "encoder",
        64,
    )
    np.testing.assert_array_equal(back.code, code.code)
    assert code.key == b"12:txt"
    assert schemas.parse_code_key(b"12:img") == (12, Modality.IMAGE)
    with pytest.raises(schemas.SchemaError):
        schemas.parse_code_key(b"twelve")


def test_code_rows_built_in_one_pass_are_byte_for_byte_the_single_code_records():
    ids = [0, 7, 2**53 - 1]
    packed = rng.integers(0, 256, (3, 8), dtype=np.uint8)
    present = [1, 3, 1]
    bodies = schemas.encode_code_rows(ids, Modality.IMAGE, present, packed, 41)
    keys = schemas.code_keys(ids, Modality.IMAGE)
    for n, (body, key) in enumerate(zip(bodies, keys, strict=True)):
        single = schemas.CodeMessage(ids[n], Modality.IMAGE, packed[n], 41, schemas.mask_modalities(present[n]))
        assert (body, key) == (schemas.encode_code(single), single.key)


def test_query_and_result_round_trip():
    feats = rng.standard_normal((3, 1024)).astype(np.float32)
    req = schemas.QueryRequest("abc", "replies", Modality.IMAGE, feats, 100, Modality.TEXT, reply_partition=1)
    back = schemas.decode_query(*schemas.encode_query(req))
    assert (back.correlation_id, back.reply_topic, back.modality, back.k, back.target, back.reply_partition) == (
        "abc",
        "replies",
        Modality.IMAGE,
        100,
        Modality.TEXT,
        1,
    )
    np.testing.assert_array_equal(back.features, feats)

    ids = rng.integers(0, 2**40, (3, 100))
    dist = rng.integers(0, 65, (3, 100)).astype(np.int32)
    res = schemas.QueryResult("abc", "ok", ids, dist, 7, (10, 20), 0.002)
    back = schemas.decode_result(*schemas.encode_result(res))
    np.testing.assert_array_equal(back.ids, ids)
    np.testing.assert_array_equal(back.distances, dist)
    assert (back.status, back.model_version, back.store_codes) == ("ok", 7, (10, 20))
    assert back.search_seconds == pytest.approx(0.002)


def test_a_status_request_carries_no_features():
    req = schemas.QueryRequest("s", "r", Modality.IMAGE, np.zeros((0, 0), np.float32), 0, Modality.TEXT)
    back = schemas.decode_query(*schemas.encode_query(req))
    assert back.features.shape == (0, 0)


@pytest.mark.parametrize(
    ("body", "headers", "reason"),
    [
        (b"x" * 40, None, "schema"),
        (b"x" * 40, [("schema", b"fpocmh.code"), ("v", b"1")], "schema"),
        (b"x" * 40, [("schema", b"fpocmh.arrival"), ("v", b"99")], "schema"),
        (b"x" * 40, [("schema", b"fpocmh.arrival"), ("v", b"one")], "schema"),
        (None, schemas.ARRIVAL_HEADERS, "decode"),
        (b"\x01\x02", schemas.ARRIVAL_HEADERS, "decode"),
        # item 1, chunk 0, image flag, then an array header promising 1,000 floats and no data
        (
            HEAD + b"\x01" + b"\x00\x01" + (1000).to_bytes(4, "little"),
            schemas.ARRIVAL_HEADERS,
            "decode",
        ),
        # unknown dtype code 99
        (HEAD + b"\x01" + b"\x63\x01" + (2).to_bytes(4, "little"), schemas.ARRIVAL_HEADERS, "decode"),
        # no modality at all
        (HEAD + b"\x00", schemas.ARRIVAL_HEADERS, "shape"),
    ],
)
def test_malformed_arrivals_raise_schema_errors_with_a_dead_letter_reason(body, headers, reason):
    with pytest.raises(schemas.SchemaError) as err:
        schemas.decode_arrival(body, headers)
    assert err.value.reason == reason


def test_trailing_bytes_and_two_dimensional_features_are_rejected():
    body, headers = schemas.encode_arrival(ItemRecord(1, np.ones(4, np.float32), None))
    with pytest.raises(schemas.SchemaError, match="trailing"):
        schemas.decode_arrival(body + b"\x00", headers)
    flat = schemas.encode_array(np.ones((2, 2), np.float32))
    with pytest.raises(schemas.SchemaError) as err:
        schemas.decode_arrival(HEAD + b"\x01" + flat, headers)
    assert err.value.reason == "shape"


def test_a_code_whose_length_disagrees_with_its_bits_is_a_shape_error():
    code = schemas.CodeMessage(1, Modality.IMAGE, np.zeros(8, np.uint8), 0, (Modality.IMAGE,))
    with pytest.raises(schemas.SchemaError) as err:
        schemas.decode_code(schemas.encode_code(code)[:-1], schemas.CODE_HEADERS)
    assert err.value.reason == "shape"


# ------------------------------------------------------------------------------------ model updates


def state_body(version: int, size: int = 50_000) -> bytes:
    tensors = {"model.w": rng.standard_normal(size // 4).astype(np.float32)}
    return ModelState("naive", version, version - 1 if version else None, tensors, {"arch": {}}).to_bytes()


def wire(parts):
    """Through the encoder and decoder, as the consumers see them."""
    return [schemas.decode_model_part(schemas.encode_model_part(p), schemas.model_part_headers(p)) for p in parts]


def test_an_update_is_applied_only_when_every_part_arrived_in_any_order():
    body = state_body(3)
    parts = wire(schemas.split_model_update(body, 3, 2, max_part_bytes=7_000))
    assert len(parts) > 5 and all(len(p.chunk) <= 7_000 for p in parts)
    random.Random(0).shuffle(parts)
    assembler = schemas.ModelUpdateAssembler()
    results = [assembler.add(p) for p in parts]
    assert results[:-1] == [None] * (len(parts) - 1)
    update = results[-1]
    assert (update.version, update.parent, update.body) == (3, 2, body)
    assert ModelState.from_bytes(update.body, checksum=update.sha256).version == 3


def test_a_missing_part_keeps_the_version_from_being_applied_and_a_newer_one_supersedes_it():
    assembler = schemas.ModelUpdateAssembler()
    v1 = wire(schemas.split_model_update(state_body(1), 1, 0, 10_000))
    v2 = wire(schemas.split_model_update(state_body(2), 2, 1, 10_000))
    assert all(assembler.add(p) is None for p in v1[1:])
    assert assembler.pending_versions == [1]
    done = [u for u in (assembler.add(p) for p in v2) if u is not None]
    assert [u.version for u in done] == [2]
    assembler.accept(2)
    assert assembler.pending_versions == []
    assert assembler.add(v1[0]) is None, "an older version is never applied after a newer one"


def test_a_completed_version_counts_as_applied_only_once_accepted_so_a_forged_high_version_freezes_nothing():
    assembler = schemas.ModelUpdateAssembler()
    forged = wire(schemas.split_model_update(state_body(5), 999, 5, 100_000))
    assert assembler.add(forged[0]).version == 999
    assembler.refuse(999)  # the caller found the state inside saying version 5
    genuine = wire(schemas.split_model_update(state_body(6), 6, 5, 100_000))
    assert assembler.add(genuine[0]).version == 6, "genuine later versions still complete"
    assert assembler.add(forged[0]) is None, "a refused version is never assembled again"


def test_a_signed_update_verifies_only_under_its_own_key_and_unsigned_ones_fail_when_a_key_is_set():
    body = state_body(7)
    (signed,) = [
        u
        for u in map(schemas.ModelUpdateAssembler().add, wire(schemas.split_model_update(body, 7, 6, 10**6, b"k1")))
        if u
    ]
    (unsigned,) = [
        u for u in map(schemas.ModelUpdateAssembler().add, wire(schemas.split_model_update(body, 7, 6, 10**6))) if u
    ]
    assert signed.signature_problem(b"k1") is None
    assert signed.signature_problem(b"k2") == "wrong signature"
    assert unsigned.signature_problem(b"k1").startswith("unsigned")
    assert unsigned.signature_problem(None) is None and signed.signature_problem(None) is None


def test_a_signature_covers_the_version_so_a_signed_update_replayed_under_another_version_fails():
    digest = hashlib.sha256(state_body(8)).digest()
    assert schemas.sign_update(b"k", 8, 7, 100, digest) != schemas.sign_update(b"k", 9, 7, 100, digest)


def test_version_1_model_parts_written_before_signatures_still_decode_as_unsigned():
    part = schemas.split_model_update(state_body(1), 1, 0, 10**6)[0]
    v1_body = struct.pack("<qqIIQ32s", 1, 0, 0, 1, part.total_size, part.sha256) + part.chunk
    decoded = schemas.decode_model_part(v1_body, schemas.schema_headers(schemas.MODEL_PART, 1))
    assert decoded.chunk == part.chunk and decoded.signature == bytes(32)


def test_a_bad_checksum_is_an_error_and_the_version_is_not_applied():
    body = state_body(4)
    parts = schemas.split_model_update(body, 4, 3, 10_000)
    corrupt = parts[1].chunk[:-1] + bytes([parts[1].chunk[-1] ^ 1])
    parts[1] = schemas.ModelPart(4, 3, 1, parts[1].count, parts[1].total_size, parts[1].sha256, corrupt)
    assembler = schemas.ModelUpdateAssembler()
    with pytest.raises(schemas.SchemaError, match="checksum"):
        for p in wire(parts):
            assembler.add(p)
    assert assembler.applied_version == -1


def test_parts_that_disagree_on_the_checksum_are_rejected():
    a = schemas.split_model_update(state_body(5), 5, 4, 10_000)
    b = schemas.split_model_update(state_body(5), 5, 4, 10_000)
    assembler = schemas.ModelUpdateAssembler()
    assembler.add(a[0])
    with pytest.raises(schemas.SchemaError, match="disagree"):
        assembler.add(b[1])


def test_model_parts_are_keyed_by_index_so_compaction_keeps_the_newest_of_each():
    parts = schemas.split_model_update(state_body(1), 1, 0, 10_000)
    assert [schemas.model_part_key(p) for p in parts[:2]] == [b"part-0", b"part-1"]
    assert schemas.header(schemas.model_part_headers(parts[0]), schemas.MODEL_VERSION_HEADER) == b"1"
