"""Kafka-free Hamming-space indexes over packed binary codes, exact by (distance, item id).

:class:`FlatIndex` scans; :class:`MIHIndex` is multi-index hashing (same answers, sublinear on the
codes our learners write). :func:`make_index` picks one by the name a config gives (``query.index``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fpocmh_core.hamming import flat, mih
from fpocmh_core.hamming.common import HammingIndex, SearchStats, saved_format, sort_by_distance_then_id
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


def restore_index(path: str | Path) -> HammingIndex:
    """The index saved in folder ``path``, of whichever kind saved it."""
    fmt = saved_format(Path(path))
    kinds = {flat.FORMAT: FlatIndex, mih.FORMAT: MIHIndex}
    if fmt not in kinds:
        raise ValueError(f"{path}: index format {fmt!r}, expected one of {sorted(kinds)}")
    return kinds[fmt].restore(path)


__all__ = [
    "KINDS",
    "FlatIndex",
    "HammingIndex",
    "MIHIndex",
    "SearchStats",
    "make_index",
    "restore_index",
    "sort_by_distance_then_id",
]
