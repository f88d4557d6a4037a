"""Wire formats of the pipeline's topics, free of Kafka: every message type's encode and decode.

Every message carries two headers: ``schema`` (the type's name) and ``v`` (its version). Bodies are
compact binary: little-endian ``struct`` fields, then raw little-endian arrays, each preceded by a
dtype code and its shape. Nothing is ever pickled, so a reader can't be made to run code. Readers keep
a decoder for every version ever written (``_DECODERS``), so old messages stay readable on replay.

Codes-topic key: one code per (item, modality), key ``"<item_id>:<img|txt>"``. A partial-modal
stream delivers an item's image and its text at unrelated times, each coded on arrival; with the key
``"<item_id>"`` alone, compaction would keep only whichever half came last.

Model updates: the body of :meth:`ModelState.to_bytes` split into parts that fit under the message
size limit. Each part names the version, its parent, its index and count, the total size and the
SHA-256 of the whole body; :class:`ModelUpdateAssembler` hands out a version only when every part has
arrived and the checksum matches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import math
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fpocmh_core.records import ItemRecord, Modality

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


def schema_version(headers: Headers | None, expected: str) -> int:
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
    if version not in _DECODERS[expected]:
        raise SchemaError("schema", f"{expected} version {raw!r} not readable; known: {sorted(_DECODERS[expected])}")
    return version


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


# -------------------------------------------------------------------------------------------- arrivals

_ARRIVAL_V1 = struct.Struct("<qiB")  # item id, chunk, flags (bit 0 image, bit 1 text, bit 2 labels)
_LABELS_FLAG = 4
ARRIVAL_HEADERS = schema_headers(ARRIVAL, 1)


@dataclass(frozen=True)
class WireDtypes:
    """Dtype codes the replayer chose once per dataset (see :func:`wire_dtype`)."""

    image: int | None = None
    text: int | None = None
    labels: int = _BITS


def encode_arrival(item: ItemRecord, dtypes: WireDtypes = WireDtypes()) -> tuple[bytes, list[tuple[str, bytes]]]:
    flags = modality_mask(item.modalities) | (_LABELS_FLAG if item.labels is not None else 0)
    parts = [_ARRIVAL_V1.pack(item.item_id, item.chunk, flags)]
    if item.image is not None:
        parts.append(encode_array(item.image, dtypes.image))
    if item.text is not None:
        parts.append(encode_array(item.text, dtypes.text))
    if item.labels is not None:
        parts.append(encode_array(item.labels, dtypes.labels))
    return b"".join(parts), ARRIVAL_HEADERS


def _decode_arrival_v1(body: bytes) -> ItemRecord:
    item_id, chunk, flags = _unpack(_ARRIVAL_V1, body, ARRIVAL)
    pos = _ARRIVAL_V1.size
    image = text = labels = None
    if flags & 1:
        image, pos = _decode_vector(body, pos, item_id)
    if flags & 2:
        text, pos = _decode_vector(body, pos, item_id)
    if flags & _LABELS_FLAG:
        labels, pos = _decode_vector(body, pos, item_id)
    if pos != len(body):
        raise SchemaError("decode", f"item {item_id}: {len(body) - pos} trailing bytes")
    if image is None and text is None:
        raise SchemaError("shape", f"item {item_id}: an arrival needs at least one modality")
    return ItemRecord(item_id, image, text, labels, chunk)


def _decode_vector(body: bytes, pos: int, item_id: int) -> tuple[np.ndarray, int]:
    values, pos = decode_array(body, pos)
    if values.ndim != 1:
        raise SchemaError("shape", f"item {item_id}: feature arrays must be 1-D, got shape {values.shape}")
    return values, pos


def decode_arrival(body: bytes | None, headers: Headers | None) -> ItemRecord:
    return _DECODERS[ARRIVAL][schema_version(headers, ARRIVAL)](body)


# ----------------------------------------------------------------------------------------------- codes

_CODE_V1 = struct.Struct("<qBBBHq")  # item id, modality, present mask, source, bits, model version
CODE_SOURCES = ("encoder", "learner")
CODE_HEADERS = schema_headers(CODE, 1)


@dataclass(frozen=True, eq=False, slots=True)
class CodeMessage:
    """One stored database code: what the codes topic holds under ``code_key(item_id, modality)``."""

    item_id: int
    modality: Modality
    code: np.ndarray  # packed uint8, bits/8 bytes
    model_version: int
    present: tuple[Modality, ...]  # modalities the arrival carried
    source: str = "encoder"  # "learner" when a learner (DLCH) assigned the code

    @property
    def bits(self) -> int:
        return self.code.shape[-1] * 8

    @property
    def key(self) -> bytes:
        return code_key(self.item_id, self.modality)


def code_key(item_id: int, modality: Modality) -> bytes:
    return code_keys((item_id,), modality)[0]


def parse_code_key(key: bytes) -> tuple[int, Modality]:
    try:
        item, _, mod = key.decode().partition(":")
        return int(item), Modality.parse(mod)
    except (AttributeError, UnicodeDecodeError, ValueError) as exc:
        raise SchemaError("decode", f"code key {key!r} is not '<item_id>:<img|txt>'") from exc


def encode_code(msg: CodeMessage) -> bytes:
    head = _CODE_V1.pack(
        msg.item_id,
        int(msg.modality),
        modality_mask(msg.present),
        CODE_SOURCES.index(msg.source),
        msg.bits,
        msg.model_version,
    )
    return head + np.ascontiguousarray(msg.code, dtype=np.uint8).tobytes()


def encode_code_rows(
    item_ids: Sequence[int], modality: Modality, present: Sequence[int], codes: np.ndarray, version: int
) -> list[bytes]:
    """The version-1 bodies of encoder codes of one modality (``present`` as modality masks), built in one
    pass: byte for byte what :func:`encode_code` gives for each, without a :class:`CodeMessage` apiece."""
    rows = np.empty(len(item_ids), code_row_dtype(codes.shape[1] * 8))
    rows["item_id"] = item_ids
    rows["modality"] = int(modality)
    rows["present"] = present
    rows["source"] = CODE_SOURCES.index("encoder")
    rows["bits"] = codes.shape[1] * 8
    rows["model_version"] = version
    rows["code"] = codes
    body, size = rows.tobytes(), rows.itemsize
    return [body[i : i + size] for i in range(0, len(body), size)]


def code_keys(item_ids: Iterable[int], modality: Modality) -> list[bytes]:
    """The keys ``"<item_id>:<img|txt>"`` of many items of one modality (:func:`code_key` for one)."""
    suffix = f":{modality.short}"
    return [(str(i) + suffix).encode() for i in item_ids]


def _decode_code_v1(body: bytes) -> CodeMessage:
    item_id, modality, present, source, bits, version = _unpack(_CODE_V1, body, CODE)
    if modality > 1 or source >= len(CODE_SOURCES) or bits % 8 or bits == 0:
        raise SchemaError("decode", f"code of item {item_id}: modality {modality}, source {source}, bits {bits}")
    code = np.frombuffer(body, np.uint8, offset=_CODE_V1.size)
    if code.size != bits // 8:
        raise SchemaError("shape", f"code of item {item_id}: {code.size} bytes for {bits} bits")
    return CodeMessage(item_id, _MODALITIES[modality], code, version, _MASKS[present & 3], CODE_SOURCES[source])


def decode_code(body: bytes | None, headers: Headers | None) -> CodeMessage:
    return _DECODERS[CODE][schema_version(headers, CODE)](body)


def code_row_dtype(bits: int) -> np.dtype:
    """One code record (version 1) as a packed numpy row: bulk readers decode a whole fetch at once."""
    return np.dtype(
        [
            ("item_id", "<i8"),
            ("modality", "u1"),
            ("present", "u1"),
            ("source", "u1"),
            ("bits", "<u2"),
            ("model_version", "<i8"),
            ("code", "u1", (bits // 8,)),
        ]
    )


def decode_code_rows(values: Sequence[bytes | None], bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, rejected): the version-1 ``bits``-bit code records among ``values`` decoded in one pass,
    and the positions of the others, for :func:`decode_code` to explain one by one.

    Headers are the caller's to check; a per-message :class:`CodeMessage` costs microseconds that a
    store catching up on 10^7 codes cannot spend.
    """
    dtype = code_row_dtype(bits)
    try:
        uniform = set(map(len, values)) <= {dtype.itemsize}  # type: ignore[arg-type]
    except TypeError:  # a value is None
        uniform = False
    if uniform:
        fits = np.arange(len(values))
        body = b"".join(values)  # type: ignore[arg-type]
    else:
        fits = np.flatnonzero([v is not None and len(v) == dtype.itemsize for v in values])
        body = b"".join(values[i] for i in fits)  # type: ignore[misc]
    rows = np.frombuffer(body, dtype)
    valid = (rows["modality"] <= 1) & (rows["source"] < len(CODE_SOURCES)) & (rows["bits"] == bits)
    rejected = np.setdiff1d(np.arange(len(values)), fits[valid], assume_unique=True)
    return rows[valid], rejected


# --------------------------------------------------------------------------------------- model updates

_PART_V1 = struct.Struct("<qqIIQ32s")  # version, parent (-1: none), index, count, total size, sha256
_PART_V2 = struct.Struct("<qqIIQ32s32s")  # v1's fields, then the HMAC-SHA256 of the update (zeros: unsigned)
_UNSIGNED = bytes(32)
_SIGNED_HEAD = struct.Struct("<qqQ32s")  # what the HMAC covers: version, parent, total size, body sha256


@dataclass(frozen=True)
class ModelPart:
    version: int
    parent: int | None
    index: int
    count: int
    total_size: int
    sha256: bytes  # 32 raw bytes of the whole body's digest
    chunk: bytes
    signature: bytes = _UNSIGNED  # HMAC-SHA256 over the update (see :func:`sign_update`); zeros: unsigned


def sign_update(key: bytes, version: int, parent: int | None, total_size: int, sha256: bytes) -> bytes:
    """HMAC-SHA256 over the whole update: its version, parent and size, and the body through its SHA-256."""
    head = _SIGNED_HEAD.pack(version, -1 if parent is None else parent, total_size, sha256)
    return hmac.new(key, b"fpocmh.model/1" + head, hashlib.sha256).digest()


def split_model_update(
    body: bytes, version: int, parent: int | None, max_part_bytes: int, key: bytes | None = None
) -> list[ModelPart]:
    """Cut a serialized :class:`ModelState` into parts of at most ``max_part_bytes`` of payload, signed
    with ``key`` when one is given."""
    if max_part_bytes <= 0:
        raise ValueError(f"max_part_bytes must be positive, got {max_part_bytes}")
    digest = hashlib.sha256(body).digest()
    signature = _UNSIGNED if key is None else sign_update(key, version, parent, len(body), digest)
    chunks = [body[i : i + max_part_bytes] for i in range(0, len(body), max_part_bytes)] or [b""]
    return [ModelPart(version, parent, i, len(chunks), len(body), digest, c, signature) for i, c in enumerate(chunks)]


def model_part_key(part: ModelPart) -> bytes:
    # Keyed by part index: on a compacted topic the newest version of every part survives, and any
    # leftover part of an older, longer update never completes a version.
    return f"part-{part.index}".encode()


def model_part_headers(part: ModelPart) -> list[tuple[str, bytes]]:
    return schema_headers(MODEL_PART, 2, **{MODEL_VERSION_HEADER: part.version})


def encode_model_part(part: ModelPart) -> bytes:
    parent = -1 if part.parent is None else part.parent
    head = _PART_V2.pack(part.version, parent, part.index, part.count, part.total_size, part.sha256, part.signature)
    return head + part.chunk


def _decode_model_part(body: bytes, fmt: struct.Struct) -> ModelPart:
    version, parent, index, count, total, digest, *signature = _unpack(fmt, body, MODEL_PART)
    if count == 0 or index >= count:
        raise SchemaError("decode", f"model version {version}: part {index} of {count}")
    chunk = bytes(body[fmt.size :])
    return ModelPart(version, None if parent < 0 else parent, index, count, total, digest, chunk, *signature)


def _decode_model_part_v1(body: bytes) -> ModelPart:
    return _decode_model_part(body, _PART_V1)


def _decode_model_part_v2(body: bytes) -> ModelPart:
    return _decode_model_part(body, _PART_V2)


def decode_model_part(body: bytes | None, headers: Headers | None) -> ModelPart:
    return _DECODERS[MODEL_PART][schema_version(headers, MODEL_PART)](body)


@dataclass(frozen=True)
class ModelUpdate:
    version: int
    parent: int | None
    body: bytes  # a serialized ModelState whose SHA-256 has been checked
    sha256: str
    signature: bytes = _UNSIGNED

    def signature_problem(self, key: bytes | None) -> str | None:
        """Why this update fails authentication under ``key`` (None: it passes, or no key is configured)."""
        if key is None:
            return None
        if self.signature == _UNSIGNED:
            return "unsigned, and a model key is configured"
        expected = sign_update(key, self.version, self.parent, len(self.body), bytes.fromhex(self.sha256))
        return None if hmac.compare_digest(expected, self.signature) else "wrong signature"


class ModelUpdateAssembler:
    """Collects parts (in any order, interleaved across versions) into checksummed model updates.

    An update handed out by :meth:`add` is applied only when the caller :meth:`accept`s it (after its
    own checks: signature, the version inside the state, the model itself); only then do versions at
    or below it stop counting. So a forged part that claims a huge version can't freeze the updates
    that follow. Versions at or below the accepted one, and refused ones, are ignored, so replaying the
    topic from the start is harmless; at most ``max_pending`` incomplete versions are kept (the oldest
    go first), so a lost part can't grow memory.
    """

    def __init__(self, applied_version: int = -1, max_pending: int = 4) -> None:
        self.applied_version = applied_version
        self.max_pending = max_pending
        self._pending: dict[int, dict[int, ModelPart]] = {}
        self._refused: set[int] = set()

    def add(self, part: ModelPart) -> ModelUpdate | None:
        """The complete, checksummed update once ``part`` was its last missing piece, else None.

        Raises :class:`SchemaError` when the parts disagree or the checksum does not match; the
        version is then refused.
        """
        if part.version <= self.applied_version or part.version in self._refused:
            return None
        parts = self._pending.setdefault(part.version, {})
        first = next(iter(parts.values()), part)
        if (first.count, first.total_size, first.sha256, first.parent, first.signature) != (
            part.count,
            part.total_size,
            part.sha256,
            part.parent,
            part.signature,
        ):
            self.refuse(part.version)
            raise SchemaError("decode", f"model version {part.version}: parts disagree on count, size or checksum")
        parts[part.index] = part
        self._trim()
        if len(parts) < part.count:
            return None
        del self._pending[part.version]
        body = b"".join(parts[i].chunk for i in range(part.count))
        digest = hashlib.sha256(body).digest()
        if len(body) != part.total_size or digest != part.sha256:
            self.refuse(part.version)
            raise SchemaError(
                "decode",
                f"model version {part.version}: checksum mismatch ({len(body)} of {part.total_size} bytes, "
                f"sha256 {digest.hex()[:12]} vs {part.sha256.hex()[:12]}); not applied",
            )
        return ModelUpdate(part.version, part.parent, body, digest.hex(), part.signature)

    def accept(self, version: int) -> None:
        """``version`` is in use: it and everything older is done with."""
        self.applied_version = max(self.applied_version, version)
        self._pending = {v: p for v, p in self._pending.items() if v > version}

    def refuse(self, version: int) -> None:
        """``version`` failed a check: its parts are dropped and never assembled again."""
        self._refused.add(version)
        self._pending.pop(version, None)

    @property
    def pending_versions(self) -> list[int]:
        return sorted(self._pending)

    def _trim(self) -> None:
        while len(self._pending) > self.max_pending:
            del self._pending[min(self._pending)]


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
    return _DECODERS[INTENT][schema_version(headers, INTENT)](body)


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
    return _DECODERS[QUERY][schema_version(headers, QUERY)](body)


_RESULT_V1 = struct.Struct("<Bqqqf")  # status, model version, image codes, text codes, search seconds
# v2 adds the answering shard (-1: the whole store) and the shard count, then (after the arrays) the
# next offset per codes partition that the answering store reflects.
_RESULT_V2 = struct.Struct("<Bqqqfhh")
# "behind": the store had not applied the request's consistency bound within its wait; "partial": a
# client's merge of shard answers that lacks some shards (never on the wire).
RESULT_STATUSES = ("ok", "not_ready", "bad_request", "behind", "partial")
RESULT_HEADERS = schema_headers(RESULT, 2)


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


def encode_result(res: QueryResult) -> tuple[bytes, list[tuple[str, bytes]]]:
    shard = -1 if res.shard is None else res.shard
    head = _RESULT_V2.pack(
        RESULT_STATUSES.index(res.status),
        res.model_version,
        *res.store_codes,
        res.search_seconds,
        shard,
        res.shard_count,
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
    status, version, n_img, n_txt, seconds, *shard = _unpack(head, body, RESULT)
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
    return _DECODERS[RESULT][schema_version(headers, RESULT)](body)


def _guard(decoder: Callable[[bytes], Any]) -> Callable[[bytes | None], Any]:
    """A missing body is a decode error, not an AttributeError."""

    def decode(body: bytes | None) -> Any:
        if body is None:
            raise SchemaError("decode", "message has no value")
        return decoder(body)

    return decode


# Every version ever written, per schema: add the new version here and keep the old decoders.
_DECODERS = {
    ARRIVAL: {1: _guard(_decode_arrival_v1)},
    CODE: {1: _guard(_decode_code_v1)},
    MODEL_PART: {1: _guard(_decode_model_part_v1), 2: _guard(_decode_model_part_v2)},
    QUERY: {
        1: _guard(_fields_then_offsets(_decode_query_fields, _QUERY_V1)),
        2: _guard(_fields_then_offsets(_decode_query_fields, _QUERY_V2, "min_offsets")),
    },
    INTENT: {1: _guard(_decode_intent_v1)},
    RESULT: {
        1: _guard(_fields_then_offsets(_decode_result_fields, _RESULT_V1)),
        2: _guard(_fields_then_offsets(_decode_result_fields, _RESULT_V2, "offsets")),
    },
}
