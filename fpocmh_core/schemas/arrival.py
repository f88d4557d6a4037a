"""Arrivals: one item's features (either modality may be missing), labels and chunk."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from fpocmh_core.records import ItemRecord
from fpocmh_core.schemas.wire import (
    _BITS,
    ARRIVAL,
    Headers,
    SchemaError,
    _unpack,
    decode_array,
    encode_array,
    guard,
    modality_mask,
    read_versioned,
    schema_headers,
)

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
    return read_versioned(body, headers, ARRIVAL, _ARRIVAL_DECODERS)


# Every version ever written: add the new version here and keep the old decoders.
_ARRIVAL_DECODERS = {1: guard(_decode_arrival_v1)}
