"""The shard's code store: per modality one Hamming index (``query.index``: the flat scan or exact
multi-index hashing, :mod:`fpocmh_core.hamming`), keyed by (item, modality).

Answers are ordered by (distance, item id) everywhere, so any split of the codes over shards merges
back into exactly this store's answer, ties included (see :func:`consumers.query.shards.merge_topk`). The
flat scan relies on faiss scanning rows in order with one thread per query (``faiss.omp_set_num_threads``
as the role sets it); the tests check it on codes built to tie.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import numpy as np

from fpocmh_core import schemas
from fpocmh_core.hamming import HammingIndex, make_index
from fpocmh_core.records import Modality

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


class CodeStore:
    """Database codes by (item, modality): the newest record of a key replaces the older one, as
    compaction would, so a key written twice (a batch re-read after a crash) is held once."""

    def __init__(self, bits: int, index: str = "flat") -> None:
        self.bits = bits
        self.index = index
        self.modal = {m: self._modal_store() for m in Modality}

    def _modal_store(self) -> HammingIndex:
        return make_index(self.index, self.bits)

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
