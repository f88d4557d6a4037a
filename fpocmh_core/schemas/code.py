"""Codes: one database code per (item, modality), written once.

Codes-topic key: ``"<item_id>:<img|txt>"``. A partial-modal stream delivers an item's image and its text
at unrelated times, each coded on arrival; with the key ``"<item_id>"`` alone, compaction would keep only
whichever half came last."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from fpocmh_core.records import Modality
from fpocmh_core.schemas.wire import (
    _MASKS,
    _MODALITIES,
    CODE,
    Headers,
    SchemaError,
    _unpack,
    guard,
    modality_mask,
    read_versioned,
    schema_headers,
)

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
    return read_versioned(body, headers, CODE, _CODE_DECODERS)


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


# Every version ever written: add the new version here and keep the old decoders.
_CODE_DECODERS = {1: guard(_decode_code_v1)}
