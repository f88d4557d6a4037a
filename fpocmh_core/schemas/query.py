"""Queries and their results: a request to every shard, and each shard's answer with the offsets it reflects."""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from fpocmh_core.records import Modality
from fpocmh_core.schemas.wire import (
    QUERY,
    RESULT,
    Headers,
    SchemaError,
    _decode_str,
    _encode_str,
    _unpack,
    decode_array,
    encode_array,
    guard,
    read_versioned,
    schema_headers,
)

# ----------------------------------------------------------------------------------- queries and results

_QUERY_V1 = struct.Struct("<BBIi")  # modality, target modality, k, reply partition (-1: any)
# v2 adds how long a shard may wait for the consistency bound, and the bound itself: a minimum next
# offset per codes partition (after the features).
_QUERY_V2 = struct.Struct("<BBIiI")
QUERY_HEADERS = schema_headers(QUERY, 2)

Offsets = tuple[tuple[int, int], ...]  # (codes partition, next offset) pairs, sorted by partition


@dataclass(frozen=True, eq=False)
class QueryRequest:
    """Rank the stored ``target`` codes against each row of ``features`` (one query per row).

    ``min_offsets`` is the consistency bound: answer only from a store that has applied the codes
    topic at least up to these next offsets, waiting at most ``wait_ms`` for it (empty: no bound).
    ``reply_partition`` is where shard 0 answers; shard s answers ``s`` partitions further on (-1: any).
    """

    correlation_id: str
    reply_topic: str
    modality: Modality
    features: np.ndarray  # (n, dim); n = 0 asks for the store's status only
    k: int
    target: Modality
    reply_partition: int = -1
    min_offsets: Offsets = ()
    wait_ms: int = 0


def _encode_offsets(offsets: Offsets) -> bytes:
    return encode_array(np.array(offsets, dtype=np.int64).reshape(-1, 2))


def _decode_offsets(body: bytes, pos: int, what: str) -> tuple[Offsets, int]:
    pairs, pos = decode_array(body, pos)
    if pairs.ndim != 2 or pairs.shape[1] != 2 or pairs.dtype != np.int64:
        raise SchemaError("shape", f"{what}: offsets must be (n, 2) int64, got {pairs.shape} {pairs.dtype}")
    return tuple((int(p), int(o)) for p, o in pairs), pos


def encode_query(req: QueryRequest, dtype: int | None = None) -> tuple[bytes, list[tuple[str, bytes]]]:
    features = np.atleast_2d(req.features) if req.features.size else req.features.reshape(0, 0)
    head = _QUERY_V2.pack(int(req.modality), int(req.target), req.k, req.reply_partition, req.wait_ms)
    body = head + _encode_str(req.correlation_id) + _encode_str(req.reply_topic) + encode_array(features, dtype)
    return body + _encode_offsets(req.min_offsets), QUERY_HEADERS


def _decode_query_fields(body: bytes, head: struct.Struct) -> tuple[QueryRequest, int]:
    modality, target, k, reply_partition, *wait = _unpack(head, body, QUERY)
    if modality > 1 or target > 1:
        raise SchemaError("decode", f"query modality {modality} / target {target}; expected 0 (img) or 1 (txt)")
    correlation_id, pos = _decode_str(body, head.size)
    reply_topic, pos = _decode_str(body, pos)
    features, pos = decode_array(body, pos)
    if features.ndim != 2:
        raise SchemaError("shape", f"query {correlation_id}: features must be (n, dim), got {features.shape}")
    if not reply_topic:
        raise SchemaError("decode", f"query {correlation_id}: empty reply topic")
    req = QueryRequest(
        correlation_id,
        reply_topic,
        Modality(modality),
        features,
        k,
        Modality(target),
        reply_partition,
        wait_ms=wait[0] if wait else 0,
    )
    return req, pos


def decode_query(body: bytes | None, headers: Headers | None) -> QueryRequest:
    return read_versioned(body, headers, QUERY, _QUERY_DECODERS)


_RESULT_V1 = struct.Struct("<Bqqqf")  # status, model version, image codes, text codes, search seconds
# v2 adds the answering shard (-1: the whole store) and the shard count, then (after the arrays) the
# next offset per codes partition that the answering store reflects.
_RESULT_V2 = struct.Struct("<Bqqqfhh")
# v3 adds the seconds of the search spent hashing the query's features (the rest is the index search).
_RESULT_V3 = struct.Struct("<Bqqqfhhf")
# "behind": the store had not applied the request's consistency bound within its wait; "partial": a
# client's merge of shard answers that lacks some shards (never on the wire).
RESULT_STATUSES = ("ok", "not_ready", "bad_request", "behind", "partial")
RESULT_HEADERS = schema_headers(RESULT, 3)


@dataclass(frozen=True, eq=False)
class QueryResult:
    correlation_id: str
    status: str
    ids: np.ndarray  # (n, k) int64 item ids, nearest first by (distance, item id)
    distances: np.ndarray  # (n, k) Hamming distances
    model_version: int
    store_codes: tuple[int, int]  # (image codes, text codes) held when the request was answered
    search_seconds: float = 0.0
    error: str = ""
    shard: int | None = None  # None: the answer covers the whole store (every v1 answer does)
    shard_count: int = 1
    offsets: Offsets = ()  # what the answer reflects: next offset per codes partition of the store
    hash_seconds: float = 0.0  # of search_seconds, hashing the query's features (0 before v3)


def encode_result(res: QueryResult) -> tuple[bytes, list[tuple[str, bytes]]]:
    shard = -1 if res.shard is None else res.shard
    head = _RESULT_V3.pack(
        RESULT_STATUSES.index(res.status),
        res.model_version,
        *res.store_codes,
        res.search_seconds,
        shard,
        res.shard_count,
        res.hash_seconds,
    )
    ids = np.asarray(res.ids, dtype=np.int64)
    # Item ids and distances mostly fit in 32 and 8 bits; the dtype code tells the reader what came.
    id_dtype = np.int32 if ids.size == 0 or (ids.min() >= -(2**31) and ids.max() < 2**31) else np.int64
    dist_dtype = np.uint8 if res.distances.size == 0 or res.distances.max() < 256 else np.uint16
    body = (
        head
        + _encode_str(res.correlation_id)
        + _encode_str(res.error)
        + encode_array(ids.astype(id_dtype))
        + encode_array(np.asarray(res.distances).astype(dist_dtype))
        + _encode_offsets(res.offsets)
    )
    return body, RESULT_HEADERS


def _decode_result_fields(body: bytes, head: struct.Struct) -> tuple[QueryResult, int]:
    status, version, n_img, n_txt, seconds, *rest = _unpack(head, body, RESULT)
    shard, hashing = rest[:2], (rest[2:] or [0.0])[0]
    if status >= len(RESULT_STATUSES):
        raise SchemaError("decode", f"unknown result status {status}")
    correlation_id, pos = _decode_str(body, head.size)
    error, pos = _decode_str(body, pos)
    ids, pos = decode_array(body, pos)
    distances, pos = decode_array(body, pos)
    if ids.shape != distances.shape:
        raise SchemaError("shape", f"result {correlation_id}: ids {ids.shape} vs distances {distances.shape}")
    index, count = shard or (-1, 1)
    if count < 1 or index >= count:
        raise SchemaError("decode", f"result {correlation_id}: shard {index} of {count}")
    result = QueryResult(
        correlation_id,
        RESULT_STATUSES[status],
        ids.astype(np.int64),
        distances.astype(np.int32),
        version,
        (n_img, n_txt),
        seconds,
        error,
        None if index < 0 else index,
        count,
        hash_seconds=hashing,
    )
    return result, pos


def _fields_then_offsets(
    fields: Callable[[bytes, struct.Struct], tuple[Any, int]], head: struct.Struct, offsets_field: str | None = None
) -> Callable[[bytes], Any]:
    """A version's decoder: its head and fields, then (from v2 on) the offsets into ``offsets_field``."""

    def decode(body: bytes) -> Any:
        value, pos = fields(body, head)
        if offsets_field is None:
            return value
        offsets, _pos = _decode_offsets(body, pos, value.correlation_id)
        return dataclasses.replace(value, **{offsets_field: offsets})

    return decode


def decode_result(body: bytes | None, headers: Headers | None) -> QueryResult:
    return read_versioned(body, headers, RESULT, _RESULT_DECODERS)


# Every version ever written: add the new version here and keep the old decoders.
_QUERY_DECODERS = {
    1: guard(_fields_then_offsets(_decode_query_fields, _QUERY_V1)),
    2: guard(_fields_then_offsets(_decode_query_fields, _QUERY_V2, "min_offsets")),
}
_RESULT_DECODERS = {
    1: guard(_fields_then_offsets(_decode_result_fields, _RESULT_V1)),
    2: guard(_fields_then_offsets(_decode_result_fields, _RESULT_V2, "offsets")),
    3: guard(_fields_then_offsets(_decode_result_fields, _RESULT_V3, "offsets")),
}
