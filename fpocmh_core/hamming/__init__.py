"""Kafka-free Hamming-space indexes over packed binary codes, exact by (distance, item id).

:class:`FlatIndex` scans; :class:`MIHIndex` is multi-index hashing (same answers, sublinear on the
codes our learners write). :func:`make_index` picks one by the name a config gives (``query.index``).
"""

from __future__ import annotations

from typing import Any

from fpocmh_core.hamming.common import HammingIndex, SearchStats, sort_by_distance_then_id
from fpocmh_core.hamming.flat import FlatIndex
from fpocmh_core.hamming.mih import MIHIndex

KINDS = ("flat", "mih")


def make_index(kind: str, bits: int, **options: Any) -> HammingIndex:
    """The index named ``kind`` (one of :data:`KINDS`) for codes of ``bits``."""
    if kind == "flat":
        return FlatIndex(bits, **options)
    if kind == "mih":
        return MIHIndex(bits, **options)
    raise ValueError(f"unknown index kind {kind!r}; expected one of {KINDS}")


__all__ = ["KINDS", "FlatIndex", "HammingIndex", "MIHIndex", "SearchStats", "make_index", "sort_by_distance_then_id"]
