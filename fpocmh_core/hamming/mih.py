"""Exact k-nearest-neighbour search in Hamming space by multi-index hashing (Norouzi, Punjani and Fleet,
"Fast Search in Hamming Space with Multi-Index Hashing", CVPR 2012).

A code is cut into m substrings (:mod:`fpocmh_core.hamming.substrings`). If two codes differ in d bits,
some substring differs in at most floor(d / m) of them; so probing every table at substring radius
0, 1, ..., r finds every code within m (r + 1) - 1 bits, and the search stops at the first r where the
k-th nearest code found is within that bound. Ties at the k-th distance are all found by then, and
sorting by (distance, item id) gives exactly the flat scan's answer.

Layout of a segment (n codes of b bits):

* ``codes`` uint8 (n, b/8) and ``ids`` int64, rows grouped by the first substring's key and then by the
  others' (near codes lie near in memory, and table 0's bucket is a range of rows): 8 + b/8 bytes per code;
* per substring j > 0, its rows sorted by key (ties by row), as one packed array of ceil(log2 n)-bit row
  numbers for the m - 1 tables, plus the rows in id order (``by_id``, for upserts and id-ordered reads):
  m * 27 bits = 10.1 bytes per code at 10^8, m = 3; and the offsets of each key's bucket
  (2^width_j + 1 uint32 per table, 0.34 bytes per code);
* a bitmap of superseded rows (1 bit per code).

The search loop itself is compiled (:mod:`fpocmh_core.hamming.probe`).

Updates never rewrite a table: an upsert marks the id's old row dead in its segment and puts the new
code into a small flat *tail*; a full tail becomes a new segment, and segments of one size tier are
merged (dead rows dropped) once ``fanout`` of them exist, so each code is rebuilt about
log_fanout(n / tail) times and at most (fanout - 1) segments per tier are searched. A segment whose dead
rows pass a quarter is rebuilt on its own, which bounds the memory held by superseded codes.

One module: the tables, the segments and the index share one layout, which their save and restore write
and read field by field.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fpocmh_core.hamming import common, probe
from fpocmh_core.hamming.packed import PackedUInts, width_for
from fpocmh_core.hamming.substrings import (
    SubstringPlan,
    balanced_groups,
    contiguous_groups,
    substring_count,
)

FORMAT = "fpocmh.hamming-mih/3"
# Below this many rows a segment is scanned: its tables would cost more than they save.
MIN_TABLE_ROWS = 4096
# A query whose table entries pass this share of a segment's rows scans the segment instead (same answer).
SCAN_SHARE = 0.25
# New codes wait in a flat tail of up to this many before they become a segment with tables.
TAIL_ROWS = 65536
_KEY_CHUNK = 1 << 20


class _Tables:
    """The m tables of one segment. The segment's rows are grouped by their first substring's key, so
    table 0's bucket is a range of rows; tables 1..m-1 hold the rows sorted by their key (ties by row)."""

    def __init__(self, plan: SubstringPlan, n: int, offsets: np.ndarray, perm: PackedUInts) -> None:
        self.plan, self.n, self.offsets, self.perm = plan, n, offsets, perm
        sizes = [(1 << w) + 1 for w in plan.widths]
        self.base = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self.widths = np.array(plan.widths, np.int64)
        self._masks: np.ndarray | None = None

    @classmethod
    def build(cls, keys: np.ndarray, plan: SubstringPlan) -> _Tables:
        """From the (n, m) substring keys of rows already grouped by ``keys[:, 0]``."""
        n = keys.shape[0]
        offsets = []
        rows = np.empty((plan.m - 1) * n, np.uint32)
        row_ids = np.arange(n, dtype=np.uint64)
        for j, w in enumerate(plan.widths):
            counts = np.bincount(keys[:, j], minlength=1 << w)
            offsets.append(np.concatenate([[0], np.cumsum(counts)]))
            if j == 0:
                continue
            # (key, row) in one uint64 sorts by key with rows ascending inside a bucket, and numpy's
            # vectorised sort of uint64 is ~10x faster than a stable argsort of the keys.
            composite = (keys[:, j].astype(np.uint64) << np.uint64(32)) | row_ids
            composite.sort()
            rows[(j - 1) * n : j * n] = composite & np.uint64(0xFFFFFFFF)
            del composite
        dtype = np.uint32 if n < 1 << 32 else np.uint64
        return cls(plan, n, np.concatenate(offsets).astype(dtype), PackedUInts.pack(rows, width_for(n)))

    def word_masks(self, words: np.ndarray) -> np.ndarray:
        """(m, words) each substring's bits in the layout of :func:`common.word_view` rows like ``words``."""
        if self._masks is None or self._masks.dtype != words.dtype:
            bits = np.zeros((self.plan.m, self.plan.bits), np.uint8)
            for j, group in enumerate(self.plan.groups):
                bits[j, list(group)] = 1
            self._masks = common.word_view(np.packbits(bits, axis=1))
        return self._masks

    @property
    def nbytes(self) -> int:
        return self.offsets.nbytes + self.perm.nbytes


class _Segment:
    """Rows, their tables (None when small: scanned instead) and a dead-row bitmap. A small segment's rows
    are in id order; a tabled one's are grouped by the key of the first substring and then by the keys of
    the others (near codes lie near in memory, and table 0 needs no row numbers), with ``by_id`` the rows
    in id order."""

    def __init__(
        self, ids: np.ndarray, codes: np.ndarray, tables: _Tables | None, by_id: PackedUInts | None = None
    ) -> None:
        self.ids, self.codes, self.tables, self.by_id = ids, codes, tables, by_id
        self.words = common.word_view(codes)
        self.dead = np.zeros((ids.size + 7) // 8, np.uint8)
        self.n_dead = 0

    @classmethod
    def build(cls, ids: np.ndarray, codes: np.ndarray, substrings: int | None, assign: str) -> _Segment:
        """From ``ids`` (sorted) and their ``codes``."""
        n = ids.size
        if n < MIN_TABLE_ROWS:
            return cls(ids, codes, None)
        bits = codes.shape[1] * 8
        m = substrings or substring_count(bits, n)
        plan = balanced_groups(codes, m) if assign == "balanced" else contiguous_groups(bits, m)
        keys = np.empty((n, plan.m), np.uint32)
        for start in range(0, n, _KEY_CHUNK):
            keys[start : start + _KEY_CHUNK] = plan.keys(codes[start : start + _KEY_CHUNK])
        order = key_order(keys, plan.widths)
        by_id = np.empty(n, np.int64)
        by_id[order] = np.arange(n)
        keys = keys[order]
        tables = _Tables.build(keys, plan)
        del keys
        return cls(ids[order], np.ascontiguousarray(codes[order]), tables, PackedUInts.pack(by_id, width_for(n)))

    def __len__(self) -> int:
        return self.ids.size - self.n_dead

    def alive_mask(self, rows: np.ndarray) -> np.ndarray:
        return ((self.dead[rows >> 3] >> (rows & 7).astype(np.uint8)) & 1) == 0

    def id_rows(self) -> np.ndarray:
        """Every row, in id order."""
        return np.arange(self.ids.size) if self.by_id is None else self.by_id.unpack()

    def find(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each of ``ids`` (int64): whether a row holds it, and that row (any row where none does)."""
        n = self.ids.size
        if self.by_id is None:
            rows = np.minimum(np.searchsorted(self.ids, ids), n - 1)
            return self.ids[rows] == ids, rows
        # Binary search through by_id: the ids in id order are never held, only their rows.
        lo, hi = np.zeros(ids.size, np.int64), np.full(ids.size, n, np.int64)
        for _ in range(max(1, n.bit_length())):
            mid = np.minimum((lo + hi) >> 1, n - 1)
            below = self.ids[self.by_id[mid]] < ids
            lo, hi = np.where(below, mid + 1, lo), np.where(below, hi, mid)
        rows = self.by_id[np.minimum(lo, n - 1)]
        return self.ids[rows] == ids, rows

    def kill(self, ids: np.ndarray) -> np.ndarray:
        """Mark the alive rows of ``ids`` dead; returns which of ``ids`` were alive here."""
        if not self.ids.size or not ids.size:
            return np.zeros(ids.size, bool)
        hit, at = self.find(ids)
        hit[hit] = self.alive_mask(at[hit])
        rows = at[hit]
        np.bitwise_or.at(self.dead, rows >> 3, (1 << (rows & 7)).astype(np.uint8))
        self.n_dead += rows.size
        return hit

    def alive_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, codes) of the alive rows, in id order."""
        rows = self.id_rows()
        if self.n_dead:
            rows = rows[self.alive_mask(rows)]
        elif self.by_id is None:
            return self.ids, self.codes
        return self.ids[rows], self.codes[rows]

    def search(
        self, q: np.ndarray, q_words: np.ndarray, k: int, bound: int
    ) -> tuple[np.ndarray, np.ndarray, int, int, int, bool]:
        """The first ``k`` alive codes by (distance, id) among those within ``bound`` bits:
        (distances, ids, buckets probed, candidates compared, radius reached, scanned)."""
        t = self.tables
        if t is None:
            d, i = self._scan(q, q_words, k, bound)
            return d, i, 0, self.ids.size, -1, True
        rows, d, probes, compared, radius, status = _with_room(
            k,
            lambda room: probe.search_segment(
                self.words,
                q_words,
                t.word_masks(self.words),
                q,
                t.plan.byte_keys,
                t.widths,
                t.base,
                t.offsets,
                t.perm.words,
                t.perm.width,
                self.dead,
                self.n_dead > 0,
                k,
                bound,
                int(SCAN_SHARE * self.ids.size),  # past this many entries a scan is cheaper (same answer)
                room,
            ),
        )
        if status == probe.SCAN:
            d, i = self._scan(q, q_words, k, bound)
            return d, i, probes, compared + self.ids.size, radius, True
        ids = self.ids[rows]
        order = np.lexsort((ids, d))[:k]
        return d[order].astype(np.int32), ids[order], probes, compared, radius, False

    def _scan(self, q: np.ndarray, q_words: np.ndarray, k: int, bound: int) -> tuple[np.ndarray, np.ndarray]:
        if self.by_id is None and not self.n_dead:  # rows in id order: faiss keeps the earlier of a tie
            d, rows = common.knn_scan(self.codes, q[None], min(k, self.ids.size))
            d, i = d[0], self.ids[rows[0]]
        else:
            rows, d, _ = _with_room(
                k, lambda room: probe.scan_segment(self.words, q_words, self.dead, self.n_dead > 0, k, bound, room)
            )
            i = self.ids[rows]
            order = np.lexsort((i, d))[:k]
            d, i = d[order], i[order]
        near = d <= bound
        return d[near].astype(np.int32), i[near]

    @property
    def nbytes(self) -> int:
        tables = self.tables.nbytes if self.tables is not None else 0
        by_id = self.by_id.nbytes if self.by_id is not None else 0
        return self.ids.nbytes + self.codes.nbytes + self.dead.nbytes + tables + by_id


def _with_room(k: int, search: Callable[[int], tuple]) -> tuple:
    """``search(room)``'s answer, run again with 4x the room while more rows tied than it had room for
    (its last item :data:`~fpocmh_core.hamming.probe.FULL`)."""
    room = max(1024, 4 * k)
    while True:
        out = search(room)
        if out[-1] != probe.FULL:
            return out
        room *= 4


class MIHIndex:
    """Exact multi-index hashing over packed codes of ``bits`` (a multiple of 8, 16..128 or more).

    ``substrings`` fixes m (default: from each segment's size); ``assign`` is "balanced" (bits spread over
    substrings from the data's statistics) or "contiguous" (the paper's consecutive bits)."""

    kind = "mih"

    def __init__(
        self,
        bits: int,
        *,
        substrings: int | None = None,
        assign: str = "balanced",
        tail_rows: int | None = None,
        fanout: int = 4,
    ) -> None:
        if bits % 8 or bits <= 0:
            raise ValueError(f"code length must be a positive multiple of 8, got {bits}")
        if assign not in ("balanced", "contiguous"):
            raise ValueError(f"assign must be 'balanced' or 'contiguous', got {assign!r}")
        self.bits, self.nbytes = bits, bits // 8
        self.substrings, self.assign = substrings, assign
        self.tail_rows, self.fanout = tail_rows or TAIL_ROWS, max(2, fanout)
        self.segments: list[_Segment] = []
        self._clear_tail()
        self.last_stats = common.SearchStats.empty(0)
        _compile(self.nbytes)

    def _clear_tail(self) -> None:
        self.tail_ids = np.zeros(0, np.int64)
        self.tail_codes = np.zeros((0, self.nbytes), np.uint8)

    def __len__(self) -> int:
        return self.tail_ids.size + sum(len(s) for s in self.segments)

    # --- updates ------------------------------------------------------------------------------

    def upsert(self, ids: np.ndarray, codes: np.ndarray) -> None:
        """Store ``codes[i]`` under ``ids[i]``, replacing any code an id had; for an id given twice in
        the batch the later row wins."""
        codes = np.asarray(codes, np.uint8).reshape(-1, self.nbytes)
        if np.asarray(ids).size == 0:
            return
        ids, codes = last_wins_checked(ids, codes, self.nbytes)
        if self.tail_ids.size:
            at = np.minimum(np.searchsorted(self.tail_ids, ids), self.tail_ids.size - 1)
            known = self.tail_ids[at] == ids
            self.tail_codes[at[known]] = codes[known]
            ids, codes = ids[~known], codes[~known]
        for seg in self.segments:
            seg.kill(ids)  # the new code goes to the tail; the old row is never searched again
        at = np.searchsorted(self.tail_ids, ids)
        self.tail_ids = np.insert(self.tail_ids, at, ids)
        self.tail_codes = np.insert(self.tail_codes, at, codes, axis=0)
        self._maintain()

    def remove(self, ids: np.ndarray) -> None:
        """Forget the codes of ``ids`` (unknown ids are ignored)."""
        ids = np.unique(np.asarray(ids, np.int64))
        if self.tail_ids.size:
            keep = ~np.isin(self.tail_ids, ids)
            self.tail_ids, self.tail_codes = self.tail_ids[keep], self.tail_codes[keep]
        for seg in self.segments:
            seg.kill(ids)
        self._maintain()

    def _maintain(self) -> None:
        if self.tail_ids.size >= self.tail_rows:
            self.segments.append(self._build(self.tail_ids, self.tail_codes))
            self._clear_tail()
        # Rebuild segments that hold mostly superseded rows; drop empty ones.
        for i, seg in enumerate(self.segments):
            if seg.n_dead * 4 > seg.ids.size:
                self.segments[i] = self._build(*seg.alive_arrays())
        self.segments = [s for s in self.segments if len(s)]
        while True:
            tiers = [self._tier(len(s)) for s in self.segments]
            full = next((t for t in set(tiers) if tiers.count(t) >= self.fanout), None)
            if full is None:
                break
            merging = [s for s, t in zip(self.segments, tiers, strict=True) if t <= full]
            self.segments = [s for s, t in zip(self.segments, tiers, strict=True) if t > full]
            self.segments.append(self._merge(merging))
        self.segments.sort(key=len, reverse=True)  # search the largest first: its k-th distance bounds the rest

    def _tier(self, n: int) -> int:
        return max(0, int(math.log(max(n, 1) / self.tail_rows, self.fanout)))

    def _build(self, ids: np.ndarray, codes: np.ndarray) -> _Segment:
        return _Segment.build(ids, np.ascontiguousarray(codes), self.substrings, self.assign)

    def _merge(self, segments: list[_Segment]) -> _Segment:
        parts = [s.alive_arrays() for s in segments]
        ids = np.concatenate([p[0] for p in parts])
        codes = np.concatenate([p[1] for p in parts])
        order = np.argsort(ids, kind="stable")  # sorted runs: timsort merges them
        return self._build(ids[order], codes[order])

    def compact(self) -> None:
        """One segment holding every code (no tail, no dead rows): the fastest layout to search."""
        if len(self.segments) == 1 and not self.tail_ids.size and not self.segments[0].n_dead:
            return
        ids, codes = self.arrays()
        self.load(ids, codes)

    def load(self, ids: np.ndarray, codes: np.ndarray) -> None:
        """Replace everything with ``ids`` (sorted, unique) and their ``codes``, building the tables."""
        check_sorted(ids, codes, self.nbytes)
        self.segments = [self._build(ids, codes)] if ids.size else []
        self._clear_tail()

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, codes) of every stored code, sorted by id."""
        parts = [s.alive_arrays() for s in self.segments] + [(self.tail_ids, self.tail_codes)]
        ids = np.concatenate([p[0] for p in parts])
        codes = np.concatenate([p[1] for p in parts]).reshape(-1, self.nbytes)
        if len(parts) > 2 or self.tail_ids.size:
            order = np.argsort(ids, kind="stable")
            ids, codes = ids[order], codes[order]
        return ids, codes

    # --- search -------------------------------------------------------------------------------

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances int32, item ids int64), (n, min(k, stored)) each, per query row in (distance, id)
        order, ties at the k-th distance included exactly as a flat scan orders them."""
        q = np.ascontiguousarray(np.atleast_2d(q), dtype=np.uint8)
        n = q.shape[0]
        k = min(k, len(self))
        self.last_stats = stats = common.SearchStats.empty(n)
        if k <= 0 or n == 0:
            return np.zeros((n, 0), np.int32), np.zeros((n, 0), np.int64)
        q_words = common.word_view(q)
        out_d = np.empty((n, k), np.int32)
        out_i = np.empty((n, k), np.int64)
        for row in range(n):
            d, i = self._search_one(row, q, q_words, k, stats)
            out_d[row], out_i[row] = d, i
        return out_d, out_i

    def _search_one(
        self, row: int, q: np.ndarray, q_words: np.ndarray, k: int, stats: common.SearchStats
    ) -> tuple[np.ndarray, np.ndarray]:
        dist, ids = [np.zeros(0, np.int32)], [np.zeros(0, np.int64)]
        bound = self.bits
        if self.tail_ids.size:
            d, rows = common.knn_scan(self.tail_codes, q[row : row + 1], min(k, self.tail_ids.size))
            dist.append(d[0])
            ids.append(self.tail_ids[rows[0]])
            stats.candidates[row] += self.tail_ids.size
        for seg in self.segments:
            found = np.concatenate(dist)
            if found.size >= k:
                bound = min(bound, int(np.partition(found, k - 1)[k - 1]))
            d, i, probes, compared, radius, scanned = seg.search(q[row], q_words[row], k, bound)
            dist.append(d)
            ids.append(i)
            stats.probes[row] += probes
            stats.candidates[row] += compared
            stats.radius[row] = max(stats.radius[row], radius)
            stats.scanned[row] |= scanned and seg.tables is not None
        d_all, i_all = np.concatenate(dist), np.concatenate(ids)
        order = np.lexsort((i_all, d_all))[:k]
        return d_all[order], i_all[order]

    # --- persistence and accounting -----------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write the index as it stands to folder ``path``, tables included, so a restore rebuilds nothing:
        per segment its ids, codes, dead-row bitmap and tables as .npy, the tail's ids and codes, and the
        layout as JSON."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        layout = []
        for i, seg in enumerate(self.segments):
            arrays = {"ids": seg.ids, "codes": seg.codes, "dead": seg.dead}
            tables = None
            if seg.tables is not None:
                arrays |= {"offsets": seg.tables.offsets, "perm": seg.tables.perm.words, "by_id": seg.by_id.words}
                tables = {"groups": [list(g) for g in seg.tables.plan.groups], "width": seg.tables.perm.width}
            for name, arr in arrays.items():
                np.save(path / f"seg{i}.{name}.npy", arr, allow_pickle=False)
            layout.append({"rows": int(seg.ids.size), "tables": tables})
        np.save(path / "tail.ids.npy", self.tail_ids, allow_pickle=False)
        np.save(path / "tail.codes.npy", self.tail_codes, allow_pickle=False)
        meta: dict[str, Any] = {"format": FORMAT, "bits": self.bits, "count": len(self), "segments": layout}
        meta.update(substrings=self.substrings, assign=self.assign, tail_rows=self.tail_rows, fanout=self.fanout)
        common.write_meta(path, meta)

    @classmethod
    def restore(cls, path: str | Path, *, mmap: bool = False) -> MIHIndex:
        """The index saved in ``path`` (no rebuild; ``mmap`` maps the arrays read-only instead of reading
        them, for searching only)."""
        path = Path(path)
        meta = common.read_meta(path, FORMAT)
        index = cls(
            meta["bits"],
            substrings=meta["substrings"],
            assign=meta["assign"],
            tail_rows=meta["tail_rows"],
            fanout=meta["fanout"],
        )
        for i, layout in enumerate(meta["segments"]):
            ids = common.load_npy(path / f"seg{i}.ids.npy", mmap)
            codes = common.load_npy(path / f"seg{i}.codes.npy", mmap)
            if ids.size != layout["rows"]:
                raise ValueError(f"{path}: segment {i} holds {ids.size} rows, its layout says {layout['rows']}")
            tables = by_id = None
            if layout["tables"] is not None:
                plan = SubstringPlan(index.bits, tuple(tuple(g) for g in layout["tables"]["groups"]))
                words = common.load_npy(path / f"seg{i}.perm.npy", mmap)
                width = layout["tables"]["width"]
                perm = PackedUInts(words, width, (plan.m - 1) * ids.size)
                tables = _Tables(plan, ids.size, common.load_npy(path / f"seg{i}.offsets.npy", mmap), perm)
                by_id = PackedUInts(common.load_npy(path / f"seg{i}.by_id.npy", mmap), width, ids.size)
            if by_id is None:
                check_sorted(ids, codes, index.nbytes)
            elif codes.shape != (ids.size, index.nbytes):  # rows in key order: checking by_id would cost seconds
                raise ValueError(f"{path}: segment {i} has codes of shape {codes.shape} for {ids.size} ids")
            seg = _Segment(ids, codes, tables, by_id)
            dead = common.load_npy(path / f"seg{i}.dead.npy", mmap)
            if dead.shape != seg.dead.shape:
                raise ValueError(f"{path}: segment {i}'s dead-row bitmap has {dead.size} bytes, not {seg.dead.size}")
            seg.dead, seg.n_dead = dead, int(np.bitwise_count(dead).sum())
            index.segments.append(seg)
        tail_ids = common.load_npy(path / "tail.ids.npy", mmap)
        tail_codes = common.load_npy(path / "tail.codes.npy", mmap)
        check_sorted(tail_ids, tail_codes, index.nbytes)
        index.tail_ids, index.tail_codes = tail_ids, tail_codes
        if len(index) != meta["count"]:
            raise ValueError(f"{path}: {len(index)} codes restored, {meta['count']} saved")
        return index

    @property
    def nbytes_held(self) -> int:
        return self.tail_ids.nbytes + self.tail_codes.nbytes + sum(s.nbytes for s in self.segments)

    @property
    def table_bytes(self) -> int:
        """Bytes the index adds to the codes and ids themselves (tables and dead-row bitmaps)."""
        return sum(s.nbytes - s.ids.nbytes - s.codes.nbytes for s in self.segments)

    def stats(self) -> dict[str, Any]:
        """What a dashboard shows: the kind, each segment's rows, dead rows and table layout, the bytes."""
        return {
            "kind": self.kind,
            "count": len(self),
            "tail_rows": int(self.tail_ids.size),
            "segments": [
                {
                    "rows": int(s.ids.size),
                    "dead": int(s.n_dead),
                    "substring_widths": list(s.tables.plan.widths) if s.tables is not None else [],
                    "table_bytes": s.tables.nbytes if s.tables is not None else 0,
                }
                for s in self.segments
            ],
            "bytes_held": self.nbytes_held,
            "table_bytes": self.table_bytes,
        }


_COMPILED: set[int] = set()


def _compile(nbytes: int) -> None:
    """Have the search loop compiled (or its machine code loaded) for codes of ``nbytes`` now, once per
    process: the first compile takes seconds, which a shard's first query must not wait for."""
    if nbytes in _COMPILED:
        return
    _COMPILED.add(nbytes)
    codes = np.random.default_rng(0).integers(0, 256, (MIN_TABLE_ROWS, nbytes), dtype=np.uint8)
    seg = _Segment.build(np.arange(MIN_TABLE_ROWS, dtype=np.int64), codes, None, "contiguous")
    words = common.word_view(codes[:1])[0]
    seg.search(codes[0], words, 1, nbytes * 8)
    seg._scan(codes[0], words, 1, nbytes * 8)  # the fallback of a query whose buckets hold too much


def key_order(keys: np.ndarray, widths: tuple[int, ...]) -> np.ndarray:
    """Rows ordered by their substring keys, the first substring's most significant, as far as 64 bits
    less a row number's width go (the rest of the order is by row)."""
    n = keys.shape[0]
    row_bits = width_for(n)
    composite = np.zeros(n, np.uint64)
    room = 64 - row_bits
    for j, w in enumerate(widths):
        take = min(w, room)
        if take <= 0:
            break
        room -= take
        composite |= (keys[:, j].astype(np.uint64) >> np.uint64(w - take)) << np.uint64(room + row_bits)
    composite |= np.arange(n, dtype=np.uint64)
    composite.sort()
    return (composite & np.uint64((1 << row_bits) - 1)).astype(np.int64)


def last_wins_checked(ids: np.ndarray, codes: np.ndarray, nbytes: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(ids, np.int64).reshape(-1)
    if codes.shape != (ids.size, nbytes):
        raise ValueError(f"codes of shape {codes.shape} for {ids.size} ids of {nbytes} bytes")
    return common.last_wins(ids, codes)


def check_sorted(ids: np.ndarray, codes: np.ndarray, nbytes: int) -> None:
    if ids.size > 1 and not (np.diff(ids) > 0).all():
        raise ValueError("ids must be sorted and unique")
    if codes.shape != (ids.size, nbytes):
        raise ValueError(f"codes of shape {codes.shape} for {ids.size} ids of {nbytes} bytes")
