"""Model updates: the body of :meth:`ModelState.to_bytes` split into parts under the message size limit.

Each part names the version, its parent, its index and count, the total size and the SHA-256 of the whole
body (v2 adds an HMAC over them when a key is configured); :class:`ModelUpdateAssembler` hands out a
version only when every part has arrived and the checksum matches."""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass

from fpocmh_core.schemas.wire import (
    MODEL_PART,
    MODEL_VERSION_HEADER,
    Headers,
    SchemaError,
    _unpack,
    guard,
    read_versioned,
    schema_headers,
)

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
    return read_versioned(body, headers, MODEL_PART, _MODEL_PART_DECODERS)


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


# Every version ever written: add the new version here and keep the old decoders.
_MODEL_PART_DECODERS = {1: guard(_decode_model_part_v1), 2: guard(_decode_model_part_v2)}
