"""What every wire format shares: the schema headers, the errors, arrays and strings in a body.

Every message carries two headers: ``schema`` (the type's name) and ``v`` (its version). Bodies are
compact binary: little-endian ``struct`` fields, then raw little-endian arrays, each preceded by a
dtype code and its shape. Nothing is ever pickled, so a reader can't be made to run code.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from fpocmh_core.records import Modality

SCHEMA_HEADER = "schema"
VERSION_HEADER = "v"
MODEL_VERSION_HEADER = "model_version"

ARRIVAL = "fpocmh.arrival"
CODE = "fpocmh.code"
MODEL_PART = "fpocmh.model_part"
QUERY = "fpocmh.query"
INTENT = "fpocmh.encoder_intent"
RESULT = "fpocmh.result"

# Dead-letter headers: why the message was rejected and where it came from. The value and the
# original headers are kept as they were, so the message can be inspected or replayed.
DLQ_REASON = "dlq.reason"
DLQ_DETAIL = "dlq.detail"
DLQ_ROLE = "dlq.role"
DLQ_TOPIC = "dlq.topic"
DLQ_PARTITION = "dlq.partition"
DLQ_OFFSET = "dlq.offset"
# The whole original value's size and SHA-256; "1" in dlq.truncated when the dead letter holds only its
# first bytes (the original did not fit under the message limit, and stays findable at its offset).
DLQ_SIZE = "dlq.size"
DLQ_SHA256 = "dlq.sha256"
DLQ_TRUNCATED = "dlq.truncated"

Headers = Sequence[tuple[str, bytes | str | None]]


class SchemaError(ValueError):
    """A message that can't be read. ``reason`` is one of schema, decode, shape (the DLQ reasons)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# --------------------------------------------------------------------------------------------- headers


def schema_headers(name: str, version: int, **extra: str | int) -> list[tuple[str, bytes]]:
    headers = [(SCHEMA_HEADER, name.encode()), (VERSION_HEADER, str(version).encode())]
    headers += [(key, str(value).encode()) for key, value in extra.items()]
    return headers


def header(headers: Headers | None, name: str) -> bytes | None:
    """The last value of header ``name`` (Kafka headers may repeat), or None."""
    found = None
    for key, value in headers or ():
        if key == name:
            found = value.encode() if isinstance(value, str) else value
    return found


def schema_version(headers: Headers | None, expected: str, known: Mapping[int, object]) -> int:
    """The message's schema version, checked against ``expected`` and the versions this reader knows."""
    name = header(headers, SCHEMA_HEADER)
    if name is None:
        raise SchemaError("schema", f"no {SCHEMA_HEADER!r} header; expected {expected}")
    if name.decode(errors="replace") != expected:
        raise SchemaError("schema", f"schema {name.decode(errors='replace')!r}, expected {expected!r}")
    raw = header(headers, VERSION_HEADER)
    try:
        version = int(raw) if raw is not None else -1
    except ValueError:
        version = -1
    if version not in known:
        raise SchemaError("schema", f"{expected} version {raw!r} not readable; known: {sorted(known)}")
    return version


def read_versioned(
    body: bytes | None, headers: Headers | None, expected: str, decoders: Mapping[int, Callable[[bytes | None], Any]]
) -> Any:
    """Decode ``body`` with the decoder of the version its headers name."""
    return decoders[schema_version(headers, expected, decoders)](body)


def guard(decoder: Callable[[bytes], Any]) -> Callable[[bytes | None], Any]:
    """A missing body is a decode error, not an AttributeError."""

    def decode(body: bytes | None) -> Any:
        if body is None:
            raise SchemaError("decode", "message has no value")
        return decoder(body)

    return decode


# ---------------------------------------------------------------------------------------------- arrays

_BITS = 255  # dtype code of a 0/1 array sent as packed bits (a bag of words costs bits/8 bytes)
_DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<f4"),
    1: np.dtype("<f2"),
    2: np.dtype("u1"),
    3: np.dtype("<i4"),
    4: np.dtype("<i8"),
    5: np.dtype("<u2"),
    6: np.dtype("<f8"),
    7: np.dtype("<u4"),
}
_CODES = {dt: code for code, dt in _DTYPES.items()}
_ARRAY_HEAD = struct.Struct("<BB")
_U32 = struct.Struct("<I")
_DIMS: dict[int, struct.Struct] = {}


def wire_dtype(values: np.ndarray) -> int:
    """The most compact lossless dtype code for all of ``values``: bits, uint8, float16 or the native one.

    Call it once per dataset and modality, not per message.
    """
    values = np.asarray(values)
    if values.size and np.isin(values, (0, 1)).all():
        return _BITS
    if values.size and np.array_equal(values, values.astype(np.uint8)):
        return _CODES[np.dtype("u1")]
    if values.dtype.kind == "f" and np.array_equal(values, values.astype(np.float16)):
        return _CODES[np.dtype("<f2")]
    return dtype_code(values.dtype)


def dtype_code(dtype: np.dtype | type) -> int:
    dt = np.dtype(dtype).newbyteorder("<") if np.dtype(dtype).itemsize > 1 else np.dtype(dtype)
    if dt not in _CODES:
        raise ValueError(f"dtype {dt} has no wire code; known: {[str(d) for d in _DTYPES.values()]}")
    return _CODES[dt]


def _dims(ndim: int) -> struct.Struct:
    if ndim not in _DIMS:
        _DIMS[ndim] = struct.Struct(f"<{ndim}I")
    return _DIMS[ndim]


def encode_array(values: np.ndarray, code: int | None = None) -> bytes:
    """dtype code, ndim, shape (uint32 each), raw little-endian data."""
    values = np.asarray(values)
    code = dtype_code(values.dtype) if code is None else code
    head = _ARRAY_HEAD.pack(code, values.ndim) + _dims(values.ndim).pack(*values.shape)
    if code == _BITS:
        return head + np.packbits(values.reshape(-1) != 0).tobytes()
    return head + np.ascontiguousarray(values, dtype=_DTYPES[code]).tobytes()


def decode_array(buf: bytes | memoryview, pos: int) -> tuple[np.ndarray, int]:
    """(array, position after it); the array is a writable copy, independent of ``buf``."""
    try:
        code, ndim = _ARRAY_HEAD.unpack_from(buf, pos)
        if ndim == 1:  # every arrival's arrays: one unpack less on the per-message path
            count = _U32.unpack_from(buf, pos + _ARRAY_HEAD.size)[0]
            shape: tuple[int, ...] = (count,)
        else:
            shape = _dims(ndim).unpack_from(buf, pos + _ARRAY_HEAD.size)
            count = math.prod(shape)
    except struct.error as exc:
        raise SchemaError("decode", f"truncated array header at byte {pos}") from exc
    pos += _ARRAY_HEAD.size + 4 * ndim
    dtype = _DTYPES.get(code)
    if code == _BITS:
        nbytes = (count + 7) // 8
    elif dtype is not None:
        nbytes = count * dtype.itemsize
    else:
        raise SchemaError("decode", f"unknown array dtype code {code}")
    if pos + nbytes > len(buf):
        raise SchemaError("decode", f"array of shape {shape} runs past the end of the message ({len(buf)} bytes)")
    if code == _BITS:
        values = np.unpackbits(np.frombuffer(buf, np.uint8, nbytes, pos), count=count)
    else:
        values = np.frombuffer(buf, dtype, count, pos).copy()
    return (values if ndim == 1 else values.reshape(shape)), pos + nbytes


def _encode_str(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<H", len(raw)) + raw


def _decode_str(buf: bytes, pos: int) -> tuple[str, int]:
    try:
        (n,) = struct.unpack_from("<H", buf, pos)
    except struct.error as exc:
        raise SchemaError("decode", f"truncated string at byte {pos}") from exc
    raw = buf[pos + 2 : pos + 2 + n]
    if len(raw) != n:
        raise SchemaError("decode", f"string of {n} bytes runs past the end of the message")
    return raw.decode(errors="replace"), pos + 2 + n


def _unpack(fmt: struct.Struct, buf: bytes, what: str) -> tuple:
    try:
        return fmt.unpack_from(buf, 0)
    except (struct.error, TypeError) as exc:
        raise SchemaError("decode", f"{what}: body of {len(buf or b'')} bytes, need at least {fmt.size}") from exc


def modality_mask(modalities: Iterable[Modality]) -> int:
    mask = 0
    for m in modalities:
        mask |= 1 << m
    return mask


def mask_modalities(mask: int) -> tuple[Modality, ...]:
    return _MASKS[mask & 3]


# Lookup tables: enum construction and iteration cost microseconds on the per-message path.
_MODALITIES = (Modality.IMAGE, Modality.TEXT)
_MASKS = tuple(tuple(m for m in _MODALITIES if mask >> int(m) & 1) for mask in range(4))
