"""Encoder intents: which model version codes which offsets, written before the codes."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from fpocmh_core.schemas.wire import (
    INTENT,
    Headers,
    SchemaError,
    guard,
    read_versioned,
    schema_headers,
)

# ------------------------------------------------------------------------------------ encoder intents

_RANGE = struct.Struct("<qqq")  # from offset, up to offset (exclusive), model version
INTENT_HEADERS = schema_headers(INTENT, 1)


@dataclass(frozen=True)
class CodingRange:
    """Arrivals at offsets [start, stop) of one partition are (being) coded with ``version``."""

    start: int
    stop: int
    version: int


def intent_key(group: str, topic: str, partition: int) -> bytes:
    return f"{group}:{topic}:{partition}".encode()


def encode_intent(ranges: Sequence[CodingRange]) -> bytes:
    return b"".join(_RANGE.pack(r.start, r.stop, r.version) for r in ranges)


def _decode_intent_v1(body: bytes) -> tuple[CodingRange, ...]:
    if len(body) % _RANGE.size:
        raise SchemaError("decode", f"{INTENT}: {len(body)} bytes is not a whole number of ranges")
    return tuple(CodingRange(*_RANGE.unpack_from(body, i)) for i in range(0, len(body), _RANGE.size))


def decode_intent(body: bytes | None, headers: Headers | None) -> tuple[CodingRange, ...]:
    return read_versioned(body, headers, INTENT, _INTENT_DECODERS)


# Every version ever written: add the new version here and keep the old decoders.
_INTENT_DECODERS = {1: guard(_decode_intent_v1)}
