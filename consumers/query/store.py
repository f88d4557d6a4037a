"""The compact code store: flat arrays of item ids and packed codes, searched exactly by Hamming distance.

Per modality the store keeps two segments, each sorted by item id: a large *main* segment and a small
*delta* that takes new ids. An upsert overwrites the row of a known id in place (so a superseded code
is never searched) and inserts new ids into the delta; when the delta outgrows an eighth of the main
segment it is merged in, so every id is copied a constant number of times on average. The id -> row
map is the sorted id array itself (binary search): 8 bytes of id plus bits/8 bytes of code per stored
code and nothing else, against ~130 bytes for a faiss ``IndexBinaryIDMap2`` plus a Python set.

Answers are ordered by (distance, item id) everywhere, so any split of the codes over shards merges
back into exactly this store's answer, ties included (see :func:`consumers.query.shards.merge_topk`). The
search relies on faiss scanning rows in order with one thread per query (``faiss.omp_set_num_threads``
as the role sets it); the tests check it on codes built to tie.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator, Sequence

import faiss
import numpy as np

from fpocmh_core import schemas
from fpocmh_core.hamming.mih import MIHIndex
from fpocmh_core.records import Modality

# faiss's heap search is fastest for a short top-k, its counting search for long ones (3x at k = 1000).
HEAP_MAX_K = 256
# New ids wait in the delta until it holds this many or an eighth of the main segment.
MIN_DELTA_ROWS = 65536
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def return_freed_arrays_to_os(threshold: int = 1 << 20) -> bool:
    """Fix glibc's mmap threshold, so arrays above ``threshold`` bytes go back to the OS when freed.

    glibc raises the threshold each time a large block is freed; the store's merges then allocate
    from the heap, and the heap keeps what they free: resident memory grew to 26-46 bytes per code
    instead of 16. False where there is no glibc (nothing to fix there)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))


def _insert_sorted(ids: np.ndarray, codes: np.ndarray, new_ids: np.ndarray, new_codes: np.ndarray) -> tuple:
    """Both segments' rows merged, sorted by id (``new_ids`` sorted, disjoint from ``ids``)."""
    at = np.searchsorted(ids, new_ids)
    return np.insert(ids, at, new_ids), np.insert(codes, at, new_codes, axis=0)


def _segment_knn(codes: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """faiss's exact Hamming top-``k`` straight over a numpy array (no index copy of the codes)."""
    return faiss.knn_hamming(q, codes, k, "hc" if k <= HEAP_MAX_K else "mc")


def sort_by_distance_then_id(dist: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the first ``k`` candidates in (distance, item id) order."""
    order = np.lexsort((ids, dist), axis=1)[:, :k]
    return np.take_along_axis(dist, order, 1), np.take_along_axis(ids, order, 1)


class ModalStore:
    """The codes of one modality."""

    def __init__(self, bits: int) -> None:
        self.nbytes = bits // 8
        self.ids = np.zeros(0, np.int64)
        self.codes = np.zeros((0, self.nbytes), np.uint8)
        self._delta_ids = np.zeros(0, np.int64)
        self._delta_codes = np.zeros((0, self.nbytes), np.uint8)

    def __len__(self) -> int:
        return self.ids.size + self._delta_ids.size

    def _segments(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        yield self.ids, self.codes
        yield self._delta_ids, self._delta_codes

    def upsert(self, ids: np.ndarray, codes: np.ndarray) -> None:
        """Store ``codes[i]`` under ``ids[i]``; for an id given twice the later row wins."""
        if ids.size == 0:
            return
        # Last occurrence of every id: unique() on the reversed batch keeps the first it sees.
        uniq, first_reversed = np.unique(ids[::-1], return_index=True)
        codes = codes[::-1][first_reversed]
        ids = uniq
        for seg_ids, seg_codes in self._segments():
            if not seg_ids.size or not ids.size:
                continue
            at = np.minimum(np.searchsorted(seg_ids, ids), seg_ids.size - 1)
            known = seg_ids[at] == ids
            seg_codes[at[known]] = codes[known]
            ids, codes = ids[~known], codes[~known]
        if ids.size:
            self._delta_ids, self._delta_codes = _insert_sorted(self._delta_ids, self._delta_codes, ids, codes)
        if self._delta_ids.size > max(MIN_DELTA_ROWS, self.ids.size // 8):
            self.compact()

    def compact(self) -> None:
        """Merge the delta into the main segment."""
        if self._delta_ids.size:
            self.ids, self.codes = _insert_sorted(self.ids, self.codes, self._delta_ids, self._delta_codes)
            self._delta_ids = np.zeros(0, np.int64)
            self._delta_codes = np.zeros((0, self.nbytes), np.uint8)

    def load(self, ids: np.ndarray, codes: np.ndarray) -> None:
        """Replace everything with ``ids`` (sorted, unique) and their ``codes`` (a snapshot's arrays)."""
        if ids.size > 1 and not (np.diff(ids) > 0).all():
            raise ValueError("ids must be sorted and unique")
        if codes.shape != (ids.size, self.nbytes):
            raise ValueError(f"codes of shape {codes.shape} for {ids.size} ids of {self.nbytes} bytes")
        self.ids, self.codes = ids, codes
        self._delta_ids = np.zeros(0, np.int64)
        self._delta_codes = np.zeros((0, self.nbytes), np.uint8)

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances, item ids) of the ``min(k, stored)`` nearest codes per query row, in (distance,
        id) order, ties included.

        faiss scans a segment's rows in order and, of two codes at the same distance, keeps the one it
        saw first (its heap replaces only on a strictly smaller distance; its counting search fills
        each distance in scan order). The rows are sorted by id, so each segment's top-k is the first
        k by (distance, id); merging the two segments' lists keeps that order. One scan per segment.
        """
        n = q.shape[0]
        k = min(k, len(self))
        if k == 0 or n == 0:
            return np.zeros((n, k), np.int32), np.zeros((n, k), np.int64)
        q = np.ascontiguousarray(q, dtype=np.uint8)
        dists, ids = [], []
        for seg_ids, seg_codes in self._segments():
            if seg_ids.size:
                d, rows = _segment_knn(seg_codes, q, min(k, seg_ids.size))
                dists.append(d)
                ids.append(seg_ids[rows])
        return sort_by_distance_then_id(np.concatenate(dists, axis=1), np.concatenate(ids, axis=1), k)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, codes) of every stored code, sorted by id (merges the delta first)."""
        self.compact()
        return self.ids, self.codes

    @property
    def nbytes_held(self) -> int:
        return sum(i.nbytes + c.nbytes for i, c in self._segments())


class CodeStore:
    """Database codes by (item, modality): the newest record of a key replaces the older one, as
    compaction would, so a key written twice (a batch re-read after a crash) is held once."""

    def __init__(self, bits: int, index: str = "flat") -> None:
        self.bits = bits
        self.index = index
        self.modal = {m: self._modal_store() for m in Modality}

    def _modal_store(self) -> ModalStore | MIHIndex:
        # Both keep the same contract: upserts by id, load, arrays sorted by id, exact (distance, id) order.
        return ModalStore(self.bits) if self.index == "flat" else MIHIndex(self.bits)

    def upsert_rows(self, rows: np.ndarray) -> None:
        """Rows of :func:`fpocmh_core.schemas.code_row_dtype`, in topic order."""
        for m in Modality:
            mine = rows[rows["modality"] == int(m)]
            if mine.size:
                self.modal[m].upsert(mine["item_id"], mine["code"])

    def upsert(self, ids: np.ndarray, codes: np.ndarray, modality: Modality) -> None:
        self.modal[modality].upsert(np.asarray(ids, np.int64), np.asarray(codes, np.uint8))

    def upsert_messages(self, codes: Sequence[schemas.CodeMessage]) -> None:
        """Decoded code records, in topic order (tools and tests; the role reads rows in bulk)."""
        for m in Modality:
            mine = [c for c in codes if c.modality is m]
            if mine:
                self.upsert(np.array([c.item_id for c in mine], np.int64), np.stack([c.code for c in mine]), m)

    def search(self, q_packed: np.ndarray, target: Modality, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances, item ids), nearest first by (distance, item id), (n, min(k, stored)) each."""
        return self.modal[target].search(q_packed, k)

    def count(self, modality: Modality) -> int:
        return len(self.modal[modality])

    @property
    def counts(self) -> tuple[int, int]:
        return self.count(Modality.IMAGE), self.count(Modality.TEXT)

    def codes(self, modality: Modality) -> tuple[np.ndarray, np.ndarray]:
        """(item ids, packed codes) of every stored code of ``modality``, sorted by id."""
        return self.modal[modality].arrays()

    def clear(self) -> None:
        self.modal = {m: self._modal_store() for m in Modality}
