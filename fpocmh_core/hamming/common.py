"""What every Hamming index here shares: the (distance, item id) order, last-write-wins batches, the
faiss scan and the per-query statistics a search leaves behind."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import faiss
import numpy as np

# faiss's heap search is fastest for a short top-k, its counting search for long ones (3x at k = 1000).
HEAP_MAX_K = 256
META = "index.json"


def sort_by_distance_then_id(dist: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the first ``k`` candidates in (distance, item id) order."""
    order = np.lexsort((ids, dist), axis=1)[:, :k]
    return np.take_along_axis(dist, order, 1), np.take_along_axis(ids, order, 1)


def last_wins(ids: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The batch with one row per id, sorted by id, the later row of an id given twice kept."""
    ids = np.asarray(ids, np.int64)
    codes = np.asarray(codes, np.uint8)
    # unique() on the reversed batch keeps the first occurrence it sees, which is the last one given.
    uniq, first_reversed = np.unique(ids[::-1], return_index=True)
    return uniq, np.ascontiguousarray(codes[::-1][first_reversed])


def word_view(codes: np.ndarray) -> np.ndarray:
    """Packed codes (n, nbytes) as (n, words) of the widest unsigned integer that divides a row, so a
    distance is a few XORs and popcounts instead of one per byte."""
    nbytes = codes.shape[1]
    word = next(w for w in (8, 4, 2, 1) if nbytes % w == 0)
    return np.ascontiguousarray(codes).view(f"<u{word}")


def knn_scan(codes: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """faiss's exact Hamming top-``k`` over a numpy array, (distances, rows). Of two rows at one distance it
    keeps the earlier one (heap: replaces only on a strictly smaller distance; counting: scan order)."""
    return faiss.knn_hamming(q, codes, k, "hc" if k <= HEAP_MAX_K else "mc")


def write_meta(path: Path, meta: dict[str, Any]) -> None:
    (path / META).write_text(json.dumps(meta, indent=1))


def saved_format(path: Path) -> str | None:
    """The format an index saved in ``path`` names (ValueError when its metadata is unreadable)."""
    try:
        return json.loads((path / META).read_text()).get("format")
    except (OSError, ValueError, AttributeError) as exc:
        raise ValueError(f"{path}: unreadable {META} ({exc})") from exc


def read_meta(path: Path, fmt: str) -> dict[str, Any]:
    meta = json.loads((path / META).read_text())
    if meta.get("format") != fmt:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {fmt!r}")
    return meta


def load_npy(path: Path, mmap: bool = False) -> np.ndarray:
    return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)


@dataclass
class SearchStats:
    """Per query of the last search: buckets looked up, codes whose distance was computed, the substring
    radius reached (-1 where no table was probed) and whether the search fell back to a scan."""

    probes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    candidates: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    radius: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    scanned: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))

    @classmethod
    def empty(cls, n: int) -> SearchStats:
        return cls(np.zeros(n, np.int64), np.zeros(n, np.int64), np.full(n, -1, np.int64), np.zeros(n, bool))


class HammingIndex(Protocol):
    """The contract of a shard's per-modality code index (the flat store's, plus save/restore):

    an id holds at most one code (an upsert replaces it, and the old code is never found again),
    answers are ordered by (distance, item id) with ties at the k-th distance broken by the smaller id,
    so shards merge into one exact answer."""

    kind: str
    bits: int
    last_stats: SearchStats

    def __len__(self) -> int: ...
    def upsert(self, ids: np.ndarray, codes: np.ndarray) -> None: ...
    def remove(self, ids: np.ndarray) -> None: ...
    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...
    def compact(self) -> None: ...
    def load(self, ids: np.ndarray, codes: np.ndarray) -> None: ...
    def arrays(self) -> tuple[np.ndarray, np.ndarray]: ...
    def save(self, path: str | Path) -> None: ...
    @property
    def nbytes_held(self) -> int: ...
    @property
    def table_bytes(self) -> int: ...
    def stats(self) -> dict[str, Any]: ...
