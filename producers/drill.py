"""A fault drill: bad arrivals of every kind mixed into a replay, to watch the pipeline keep them out.

``fpocmh replay --bad-share 0.01`` (and ``fpocmh run``) sends, besides the protocol's arrivals, about
that share of bad ones, in turn: NaN features, infinite features, a feature vector one element short,
labels of the wrong length, labels that are not 0/1, a negative item id, garbage bytes, and a message
over the pipeline's message limit. None may be coded or learnt; each must reach the dead-letter topic
with its reason while every valid arrival is coded once. Bad arrivals carry item ids from
``BAD_ID_BASE`` on, so they can't be mistaken for the dataset's items.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from fpocmh_core import schemas
from fpocmh_core.data import CrossModalDataset
from fpocmh_core.records import ItemRecord

BAD_ID_BASE = 10**12
# The dead-letter reason each kind must get.
KINDS = {
    "nan_features": "invalid",
    "inf_features": "invalid",
    "short_features": "shape",
    "label_count": "shape",
    "label_values": "invalid",
    "negative_id": "invalid",
    "garbage": "decode",
    "oversize": "oversize",
}
_U8_LABELS = schemas.WireDtypes(labels=schemas.dtype_code(np.uint8))


@dataclass(frozen=True)
class BadArrival:
    kind: str
    value: bytes
    headers: list[tuple[str, bytes]]

    @property
    def reason(self) -> str:
        return KINDS[self.kind]


def bad_arrivals(ds: CrossModalDataset, message_max_bytes: int) -> Iterator[BadArrival]:
    """Bad arrivals for ever, every kind in turn, built from real rows of ``ds``."""
    n = 0
    while True:
        for kind in KINDS:
            row = n % len(ds)
            yield BadArrival(kind, *_make(kind, ds, row, BAD_ID_BASE + n, message_max_bytes))
            n += 1


def _make(kind: str, ds: CrossModalDataset, row: int, item_id: int, limit: int) -> tuple[bytes, list]:
    image, text, labels = ds.image[row].copy(), ds.text[row].astype(np.float32), ds.labels[row].copy()
    if kind == "garbage":
        return b"\x01\x02 not an arrival", schemas.ARRIVAL_HEADERS
    if kind == "oversize":
        # Just over the pipeline's limit: a broker with Kafka's default limit (1 MiB) still takes it.
        floats = limit // 4 + 4096
        return schemas.encode_arrival(ItemRecord(item_id, np.ones(floats, np.float32), None, None))
    if kind == "nan_features":
        image[row % image.size] = np.nan
        record = ItemRecord(item_id, image, None, labels)
    elif kind == "inf_features":
        text[row % text.size] = np.inf
        record = ItemRecord(item_id, None, text, labels)
    elif kind == "short_features":
        record = ItemRecord(item_id, image[:-1], None, labels)
    elif kind == "label_count":
        record = ItemRecord(item_id, image, None, np.ones(labels.size + 1, np.uint8))
    elif kind == "label_values":
        record = ItemRecord(item_id, image, None, (labels * 2).astype(np.uint8))
    else:
        record = ItemRecord(-1 - row, image, None, labels)
    return schemas.encode_arrival(record, _U8_LABELS)
