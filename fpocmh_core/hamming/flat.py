"""The flat scan behind the same interface as the multi-index: every stored code compared per query.

Per modality two segments sorted by item id, a large main one and a small delta that takes new ids
(the shard store's layout): an upsert overwrites a known id's row in place, so a superseded code is
never searched, and the delta is merged in when it outgrows an eighth of the main segment. 8 bytes of
id plus bits/8 bytes of code per stored code and nothing else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fpocmh_core.hamming import common
from fpocmh_core.hamming.mih import check_sorted, last_wins_checked

FORMAT = "fpocmh.hamming-flat/1"
MIN_DELTA_ROWS = 65536


class FlatIndex:
    """Exact Hamming top-k by scanning (faiss), ordered by (distance, item id)."""

    kind = "flat"

    def __init__(self, bits: int) -> None:
        if bits % 8 or bits <= 0:
            raise ValueError(f"code length must be a positive multiple of 8, got {bits}")
        self.bits, self.nbytes = bits, bits // 8
        self.load(np.zeros(0, np.int64), np.zeros((0, self.nbytes), np.uint8))
        self.last_stats = common.SearchStats.empty(0)

    def __len__(self) -> int:
        return self.ids.size + self._delta_ids.size

    def _segments(self) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(self.ids, self.codes), (self._delta_ids, self._delta_codes)]

    def upsert(self, ids: np.ndarray, codes: np.ndarray) -> None:
        """Store ``codes[i]`` under ``ids[i]``; for an id given twice the later row wins."""
        codes = np.asarray(codes, np.uint8).reshape(-1, self.nbytes)
        if np.asarray(ids).size == 0:
            return
        ids, codes = last_wins_checked(ids, codes, self.nbytes)
        for seg_ids, seg_codes in self._segments():
            if not seg_ids.size or not ids.size:
                continue
            at = np.minimum(np.searchsorted(seg_ids, ids), seg_ids.size - 1)
            known = seg_ids[at] == ids
            seg_codes[at[known]] = codes[known]
            ids, codes = ids[~known], codes[~known]
        at = np.searchsorted(self._delta_ids, ids)
        self._delta_ids = np.insert(self._delta_ids, at, ids)
        self._delta_codes = np.insert(self._delta_codes, at, codes, axis=0)
        if self._delta_ids.size > max(MIN_DELTA_ROWS, self.ids.size // 8):
            self.compact()

    def remove(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids, np.int64)
        keep = ~np.isin(self.ids, ids)
        keep_delta = ~np.isin(self._delta_ids, ids)
        self.ids, self.codes = self.ids[keep], self.codes[keep]
        self._delta_ids, self._delta_codes = self._delta_ids[keep_delta], self._delta_codes[keep_delta]

    def compact(self) -> None:
        """Merge the delta into the main segment."""
        if self._delta_ids.size:
            at = np.searchsorted(self.ids, self._delta_ids)
            ids = np.insert(self.ids, at, self._delta_ids)
            codes = np.insert(self.codes, at, self._delta_codes, axis=0)
            self.load(ids, codes)

    def load(self, ids: np.ndarray, codes: np.ndarray) -> None:
        """Replace everything with ``ids`` (sorted, unique) and their ``codes``."""
        check_sorted(ids, codes, self.nbytes)
        self.ids, self.codes = ids, codes
        self._delta_ids = np.zeros(0, np.int64)
        self._delta_codes = np.zeros((0, self.nbytes), np.uint8)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        self.compact()
        return self.ids, self.codes

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances, item ids), (n, min(k, stored)) each, in (distance, id) order: faiss keeps the
        earlier row of a tie and rows are sorted by id, so each segment's top-k is exact; merging the
        two segments' lists keeps the order."""
        q = np.ascontiguousarray(np.atleast_2d(q), dtype=np.uint8)
        n = q.shape[0]
        k = min(k, len(self))
        self.last_stats = common.SearchStats.empty(n)
        if k <= 0 or n == 0:
            return np.zeros((n, 0), np.int32), np.zeros((n, 0), np.int64)
        dists, ids = [], []
        for seg_ids, seg_codes in self._segments():
            if seg_ids.size:
                d, rows = common.knn_scan(seg_codes, q, min(k, seg_ids.size))
                dists.append(d)
                ids.append(seg_ids[rows])
        self.last_stats.candidates[:] = len(self)
        self.last_stats.scanned[:] = True
        return common.sort_by_distance_then_id(np.concatenate(dists, axis=1), np.concatenate(ids, axis=1), k)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        ids, codes = self.arrays()
        np.save(path / "ids.npy", ids, allow_pickle=False)
        np.save(path / "codes.npy", codes, allow_pickle=False)
        common.write_meta(path, {"format": FORMAT, "bits": self.bits, "count": int(ids.size)})

    @classmethod
    def restore(cls, path: str | Path, *, mmap: bool = False) -> FlatIndex:
        path = Path(path)
        index = cls(common.read_meta(path, FORMAT)["bits"])
        index.load(common.load_npy(path / "ids.npy", mmap), common.load_npy(path / "codes.npy", mmap))
        return index

    @property
    def nbytes_held(self) -> int:
        return sum(i.nbytes + c.nbytes for i, c in self._segments())

    @property
    def table_bytes(self) -> int:
        return 0

    def stats(self) -> dict[str, Any]:
        return {"kind": self.kind, "count": len(self), "bytes_held": self.nbytes_held, "table_bytes": 0}
