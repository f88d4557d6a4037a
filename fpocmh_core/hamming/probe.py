"""The multi-index search of one segment as one compiled loop (numba): the tables are probed radius by
radius, each row's distance is computed once, and the search stops at the first table after which no
unseen code can be nearer than the k-th found.

Why compiled: a search touches 10^4-10^6 table entries, and on learned codes (which cluster) most of the
time went to the dozen numpy passes per chunk of candidates, not to reading them. Compiled, the time goes
to reading: a row number from tables 1..m-1 points anywhere in the segment's codes, so every code is a
cache miss, and the loop asks for each code (LLVM's prefetch) as it reads the row number, a batch before it
compares it. On 10^7 learned codes that took the p99 of a top-100 from 5.1 to 1.8 ms (same index, same
queries, alternating rounds).

Two rules make it exact and cheap (Norouzi, Punjani and Fleet, TPAMI 2014, section 4):

* *First discovery.* A row sits in one bucket per table, so it comes back up to m times. It is counted
  where it is first found: at the smallest substring distance any table gives it, in the first table of
  that radius in the search's order; elsewhere it is skipped after its m substring distances, which its
  full distance needs anyway. No set of seen rows is kept.
* *Stopping inside a radius.* Once every table is searched to radius r - 1 and p of them to radius r,
  an unseen code differs in at least r + 1 bits in each of the p and r in the others: m r + p bits in
  all. Tables are taken at each radius from the fewest entries to the most, so the last (dearest) one is
  the one most often skipped.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

_M1 = np.uint64(0x5555555555555555)
_M2 = np.uint64(0x3333333333333333)
_M4 = np.uint64(0x0F0F0F0F0F0F0F0F)
_H01 = np.uint64(0x0101010101010101)
_BATCH = 256  # table entries whose codes are loaded before any is compared
# What a search returns besides its rows: it answered, its entries passed the budget (scan instead), or
# more rows tied within the limit than it had room for (search again with more room).
DONE, SCAN, FULL = 0, 1, 2


@numba.njit(cache=True, nogil=True, inline="always")
def _popcount(x: np.uint64) -> np.int64:
    x = x - ((x >> np.uint64(1)) & _M1)
    x = (x & _M2) + ((x >> np.uint64(2)) & _M2)
    x = (x + (x >> np.uint64(4))) & _M4
    return np.int64((x * _H01) >> np.uint64(56))


@intrinsic
def _prefetch(typingctx, codes, row):  # noqa: ARG001 (numba's intrinsic signature)
    """Ask for row ``row`` of the 2-d array ``codes`` to be brought into cache (LLVM's prefetch: read, keep)."""

    def codegen(context, builder, signature, args):
        array = context.make_array(signature.args[0])(context, builder, args[0])
        zero = context.get_constant(types.intp, 0)
        address = cgutils.get_item_pointer(context, builder, signature.args[0], array, [args[1], zero])
        byte_ptr = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [byte_ptr, i32, i32, i32]), "llvm.prefetch.p0"
        )
        builder.call(fn, [builder.bitcast(address, byte_ptr), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return types.void(codes, row), codegen


@numba.njit(cache=True, nogil=True, inline="always")
def _next_mask(v: np.int64) -> np.int64:
    """The next larger integer with as many bits set (Gosper's hack)."""
    c = v & -v
    r = v + c
    return (((r ^ v) >> 2) // c) | r


@numba.njit(cache=True, nogil=True, inline="always")
def _entry(words: np.ndarray, width: np.int64, pos: np.int64) -> np.int64:
    """Entry ``pos`` of a :class:`~fpocmh_core.hamming.packed.PackedUInts` stream."""
    bit = pos * width
    w = bit >> 5
    pair = np.uint64(words[w]) | (np.uint64(words[w + 1]) << np.uint64(32))
    return np.int64((pair >> np.uint64(bit & 31)) & np.uint64((1 << width) - 1))


@numba.njit(cache=True, nogil=True)
def search_segment(
    codes: np.ndarray,
    query: np.ndarray,
    masks: np.ndarray,
    q_bytes: np.ndarray,
    byte_keys: np.ndarray,
    widths: np.ndarray,
    base: np.ndarray,
    offsets: np.ndarray,
    perm: np.ndarray,
    perm_width: int,
    dead: np.ndarray,
    has_dead: bool,
    k: int,
    bound: int,
    budget: int,
    room: int,
) -> tuple[np.ndarray, np.ndarray, int, int, int, int]:
    """Rows of one segment's k nearest alive codes within ``bound`` bits (and every row tied with the
    k-th), their distances, buckets probed, entries read, radius reached and :data:`DONE`; or no rows and
    :data:`SCAN` once the entries to read pass ``budget``, :data:`FULL` once more than ``room`` rows lie
    within the k-th distance found.

    ``codes`` (n, words) and ``query`` (words,) are words of one unsigned type
    (:func:`~fpocmh_core.hamming.common.word_view`); ``masks`` (m, words) the bits of each substring in
    them; ``q_bytes`` the query's bytes and ``byte_keys`` (bytes, 256, m) what each byte value puts into
    each substring key (:attr:`~fpocmh_core.hamming.substrings.SubstringPlan.byte_keys`); table j's bucket
    of key x spans entries ``offsets[base[j] + x]`` to ``offsets[base[j] + x + 1]`` of table j: rows
    themselves for table 0 (rows are grouped by its key), and from entry ``(j - 1) n`` of the packed row
    numbers ``perm`` for the others; ``dead`` is the bitmap of superseded rows."""
    n, n_words = codes.shape
    m = widths.size
    q_keys = np.zeros(m, np.uint32)
    for p in range(q_bytes.size):
        for j in range(m):
            q_keys[j] |= byte_keys[p, q_bytes[p], j]
    hist = np.zeros(widths.sum() + 1, np.int64)
    limit = bound
    held = 0  # rows kept at a distance <= limit
    # Fixed buffers: an array reassigned inside the loop costs its reference counting on every entry (60x).
    rows, dist, kept = np.empty(room, np.int64), np.empty(room, np.int64), 0
    probes = 0
    read = 0
    counts = np.zeros(m, np.int64)
    place = np.zeros(m, np.int64)
    batch = np.empty(_BATCH, np.int64)
    words = np.empty((_BATCH, n_words), codes.dtype)
    dists = np.empty(_BATCH, np.int64)
    min_width = widths.min()
    r = 0
    done = False
    while r <= min_width and not done:
        buckets = _combinations(widths.max(), r)
        if read + m * buckets > budget:  # a bucket looked up costs about what an entry read does
            return rows[:0], dist[:0], probes, read, r, SCAN
        for j in range(m):
            counts[j] = 0
            v = (1 << r) - 1
            while v < (1 << widths[j]):
                b = base[j] + (np.int64(q_keys[j]) ^ v)
                counts[j] += np.int64(offsets[b + 1]) - np.int64(offsets[b])
                probes += 1
                v = _next_mask(v) if r else 1 << widths[j]
        order = np.argsort(counts, kind="mergesort")
        for p in range(m):
            place[order[p]] = p
        for p in range(m):
            j = order[p]
            if read + counts[j] > budget:
                return rows[:0], dist[:0], probes, read + counts[j], r, SCAN
            read += counts[j]
            # Table 0's entries are the rows; table j's row numbers start at (j - 1) n in perm.
            shift = np.int64(j - 1) * n if j else np.int64(0)
            v = (1 << r) - 1
            e = hi = np.int64(0)
            while True:
                # Row numbers first (each code asked for as its row is read), then the codes, then the
                # arithmetic: a row-by-row loop waits for one cache miss at a time at 10^7 codes.
                filled = 0
                while filled < _BATCH:
                    if e == hi:  # the next bucket at radius r
                        if v >= (1 << widths[j]):
                            break
                        b = base[j] + (np.int64(q_keys[j]) ^ v)
                        e, hi = np.int64(offsets[b]) + shift, np.int64(offsets[b + 1]) + shift
                        v = _next_mask(v) if r else 1 << widths[j]
                        continue
                    row = _entry(perm, perm_width, e) if j else e
                    e += 1
                    if has_dead and (dead[row >> 3] >> (row & 7)) & 1:
                        continue
                    if j:
                        _prefetch(codes, row)
                    batch[filled] = row
                    filled += 1
                if filled == 0:
                    break
                near = 0
                for i in range(filled):
                    d = 0
                    for w in range(n_words):
                        x = codes[batch[i], w] ^ query[w]
                        words[near, w] = x
                        d += _popcount(np.uint64(x))
                    batch[near] = batch[i]
                    dists[near] = d
                    near += d <= limit  # kept without a branch: most entries are not near, unpredictably
                for i in range(near):
                    d = dists[i]
                    if d > limit:
                        continue
                    seen = False
                    for t in range(m):
                        if t == j:
                            continue
                        s = 0
                        for w in range(n_words):
                            s += _popcount(np.uint64(words[i, w] & masks[t, w]))
                        if s < r or (s == r and place[t] < p):
                            seen = True
                    if seen:
                        continue
                    kept, held, limit = _keep(rows, dist, kept, hist, held, limit, k, batch[i], d)
                    if kept < 0:
                        return rows[:0], dist[:0], probes, read, r, FULL
            # Unseen codes differ in >= m r + p + 1 bits; once a table is searched to its full width, none is left.
            if limit < m * r + p + 1 or r == widths[j]:
                done = True
                break
        if not done:
            r += 1
    kept = _compact(rows, dist, kept, limit)
    return rows[:kept].copy(), dist[:kept].copy(), probes, read, r, DONE


@numba.njit(cache=True, nogil=True)
def _combinations(w: int, r: int) -> int:
    out = 1
    for i in range(r):
        out = out * (w - i) // (i + 1)
    return out


@numba.njit(cache=True, nogil=True)
def scan_segment(
    codes: np.ndarray, query: np.ndarray, dead: np.ndarray, has_dead: bool, k: int, bound: int, room: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """The rows and distances :func:`search_segment` finds, and :data:`DONE` or :data:`FULL`, by reading
    every row."""
    n, n_words = codes.shape
    hist = np.zeros(n_words * codes.itemsize * 8 + 1, np.int64)
    rows, dist, kept = np.empty(room, np.int64), np.empty(room, np.int64), 0
    limit = bound
    held = 0
    for row in range(n):
        if has_dead and (dead[row >> 3] >> (row & 7)) & 1:
            continue
        d = 0
        for w in range(n_words):
            d += _popcount(np.uint64(codes[row, w] ^ query[w]))
        if d <= limit:
            kept, held, limit = _keep(rows, dist, kept, hist, held, limit, k, row, d)
            if kept < 0:
                return rows[:0], dist[:0], FULL
    kept = _compact(rows, dist, kept, limit)
    return rows[:kept].copy(), dist[:kept].copy(), DONE


@numba.njit(cache=True, nogil=True, inline="always")
def _keep(
    rows: np.ndarray,
    dist: np.ndarray,
    kept: int,
    hist: np.ndarray,
    held: int,
    limit: int,
    k: int,
    row: int,
    d: int,
) -> tuple[int, int, int]:
    """Keep ``row`` at distance ``d`` (<= ``limit``) and lower the limit to the k-th kept distance:
    (kept, held, limit) after it, kept -1 when over half the room stays taken; ``held`` counts the kept rows
    within the limit."""
    if kept == rows.size:
        kept = _compact(rows, dist, kept, limit)
        if kept * 2 > rows.size:  # compacting again soon would make every keep cost the buffer
            return -1, held, limit
    rows[kept] = row
    dist[kept] = d
    hist[d] += 1
    held += 1
    while limit > 0 and held - hist[limit] >= k:
        held -= hist[limit]
        limit -= 1
    return kept + 1, held, limit


@numba.njit(cache=True, nogil=True)
def _compact(rows: np.ndarray, dist: np.ndarray, kept: int, limit: int) -> int:
    out = 0
    for i in range(kept):
        if dist[i] <= limit:
            rows[out] = rows[i]
            dist[out] = dist[i]
            out += 1
    return out
