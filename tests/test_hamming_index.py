"""One contract over every Hamming index a shard can hold (``query.index``): the exact top-k of the
definition, ties by (distance, item id) included, through upserts, removals and a save/restore, on
uniform, skewed and clustered codes and on the codes the real learner writes for the benchmark file."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from fpocmh_core import codes as codes_mod
from fpocmh_core.bench.index import learned_base_codes, replicate
from fpocmh_core.hamming import KINDS, MIHIndex, make_index, restore_index
from fpocmh_core.hamming.substrings import balanced_groups


def definition(q, ids, codes, k):
    """Every distance, ordered by (distance, item id), first k."""
    dist = codes_mod.hamming(q, codes)
    order = np.lexsort((np.broadcast_to(ids, dist.shape), dist), axis=1)[:, :k]
    return np.take_along_axis(dist, order, 1), ids[order]


def uniform(rng, n, bits):
    return rng.integers(0, 256, (n, bits // 8), dtype=np.uint8)


def skewed(rng, n, bits):
    """Most bits rarely set, as the learners' least informative bits are."""
    return np.packbits(rng.random((n, bits)) < rng.uniform(0.02, 0.5, bits), axis=1)


def clustered(rng, n, bits):
    """A few centres with a handful of bits flipped: codes that cluster by category, ties everywhere."""
    centres = uniform(rng, 12, bits)
    flips = np.packbits(rng.random((n, bits)) < 0.04, axis=1)
    return centres[rng.integers(0, 12, n)] ^ flips


SOURCES = {"uniform": uniform, "skewed": skewed, "clustered": clustered}


def assert_exact(index, q, ids, codes, k):
    got = index.search(q, k)
    want = definition(q, ids, codes, k)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


@pytest.fixture(scope="module")
def benchmark_learned_codes():
    """The 64-bit codes an offline FPO-CMH model (two epochs, to keep the suite short) writes for every
    image and text of the benchmark file."""
    return learned_base_codes(64, offline={"epochs": 2})


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bits", [16, 32, 64, 128])
@pytest.mark.parametrize("source", sorted(SOURCES))
def test_every_index_returns_the_exact_top_k_with_ties_by_item_id(kind, bits, source):
    rng = np.random.default_rng([bits, len(source)])
    n = 20_000
    codes = SOURCES[source](rng, n, bits)
    ids = np.sort(rng.permutation(5 * n)[:n]).astype(np.int64)
    index = make_index(kind, bits)
    index.load(ids, codes)
    q = np.concatenate([codes[:10], SOURCES[source](rng, 10, bits)])  # stored codes and fresh ones
    for k in (1, 10, 100, 1000):
        assert_exact(index, q, ids, codes, k)


@pytest.mark.parametrize("kind", KINDS)
def test_every_index_is_exact_on_the_codes_the_learner_writes_for_the_benchmark(kind, benchmark_learned_codes):
    base = benchmark_learned_codes
    rng = np.random.default_rng(0)
    codes = np.concatenate([base, replicate(base, 3 * base.shape[0], 0.05, rng)])
    ids = np.arange(codes.shape[0], dtype=np.int64)
    index = make_index(kind, 64)
    index.load(ids, codes)
    q = replicate(base, 30, 0.05, np.random.default_rng(1))
    for k in (10, 100, 1000):
        assert_exact(index, q, ids, codes, k)


@pytest.mark.parametrize("kind", KINDS)
def test_an_upserted_id_keeps_only_its_newest_code_and_a_removed_id_is_never_found(kind):
    rng = np.random.default_rng(3)
    n, bits = 30_000, 64
    ids, codes = np.arange(n, dtype=np.int64), skewed(rng, n, bits)
    index = make_index(kind, bits)
    for start in range(0, n, 4_999):  # batches as a shard reads them
        index.upsert(ids[start : start + 4_999], codes[start : start + 4_999])
    newer = codes[::3] ^ np.uint8(0xA5)
    index.upsert(ids[::3], newer)
    index.remove(ids[1::7])
    current = codes.copy()
    current[::3] = newer
    alive = np.ones(n, bool)
    alive[1::7] = False
    q = np.concatenate([codes[::3][:10], newer[:10]])  # the superseded codes must not come back
    assert len(index) == alive.sum()
    for k in (10, 100):
        assert_exact(index, q, ids[alive], current[alive], k)


@pytest.mark.parametrize("kind", KINDS)
def test_a_later_row_of_an_id_in_one_batch_wins(kind):
    index = make_index(kind, 16)
    index.upsert(np.array([5, 5, 2]), np.array([[0, 0], [255, 255], [0, 1]], np.uint8))
    assert len(index) == 2
    dist, ids = index.search(np.array([[255, 255]], np.uint8), 2)
    assert ids.tolist() == [[5, 2]] and dist.tolist() == [[0, 15]]


@pytest.mark.parametrize("kind", KINDS)
def test_a_saved_index_restores_to_the_same_answers_segments_superseded_rows_and_tail_included(kind, tmp_path):
    rng = np.random.default_rng(4)
    ids, codes = np.arange(25_000, dtype=np.int64), clustered(rng, 25_000, 64)
    index = MIHIndex(64, tail_rows=2048) if kind == "mih" else make_index(kind, 64)
    for start in range(0, ids.size, 3_000):
        index.upsert(ids[start : start + 3_000], codes[start : start + 3_000])
    index.upsert(ids[:100], codes[-100:])
    index.remove(ids[200:300])
    if kind == "mih":
        layout = index.stats()
        assert len(layout["segments"]) > 1 and layout["tail_rows"] > 0 and any(s["dead"] for s in layout["segments"])
    index.save(tmp_path / kind)
    restored = restore_index(tmp_path / kind)
    assert type(restored) is type(index) and len(restored) == len(index) == 24_900
    q = codes[::2500]
    for k in (10, 1000):
        for want, got in zip(index.search(q, k), restored.search(q, k), strict=True):
            np.testing.assert_array_equal(got, want)


def test_a_damaged_saved_index_is_refused_not_half_loaded(tmp_path):
    index = MIHIndex(64, tail_rows=2048)
    index.upsert(np.arange(5000), uniform(np.random.default_rng(6), 5000, 64))
    index.save(tmp_path)
    np.save(tmp_path / "seg0.dead.npy", np.zeros(3, np.uint8))
    with pytest.raises(ValueError, match="dead-row bitmap"):
        restore_index(tmp_path)


@pytest.mark.parametrize("kind", KINDS)
def test_an_empty_index_and_k_above_the_count_answer_what_there_is(kind):
    index = make_index(kind, 64)
    dist, ids = index.search(np.zeros((3, 8), np.uint8), 10)
    assert dist.shape == ids.shape == (3, 0)
    index.upsert(np.array([9, 4, 7]), np.array([[1] * 8, [0] * 8, [3] * 8], np.uint8))
    dist, ids = index.search(np.zeros((1, 8), np.uint8), 10)
    assert ids.tolist() == [[4, 9, 7]] and dist.tolist() == [[0, 8, 16]]


def test_multi_index_hashing_looks_at_a_small_share_of_the_codes_and_says_so():
    rng = np.random.default_rng(5)
    n = 200_000
    codes = uniform(rng, n, 64)
    index = make_index("mih", 64)
    index.load(np.arange(n, dtype=np.int64), codes)
    index.search(codes[:20], 1)  # a stored code is its own nearest: found at substring radius 0
    stats = index.last_stats
    assert (stats.probes > 0).all() and (stats.radius == 0).all() and not stats.scanned.any()
    assert stats.candidates.max() < n / 100
    layout = index.stats()
    assert layout["kind"] == "mih" and layout["table_bytes"] > 0 and layout["count"] == n
    flat = make_index("flat", 64)
    flat.load(np.arange(n, dtype=np.int64), codes)
    flat.search(codes[:2], 1)
    assert (flat.last_stats.candidates == n).all() and flat.last_stats.scanned.all()
    assert flat.stats()["table_bytes"] == 0


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_multi_index_hashing_keeps_every_near_row_when_they_outgrow_its_first_buffer(source):
    rng = np.random.default_rng(11)
    n = 20_000
    ids, codes = np.sort(rng.permutation(3 * n)[:n]).astype(np.int64), SOURCES[source](rng, n, 64)
    q = np.concatenate([codes[:10], SOURCES[source](rng, 10, 64)])
    index = MIHIndex(64)
    index.load(ids, codes)
    assert_exact(index, q, ids, codes, 700)  # the search starts with room for 4 k = 2,800 near rows


def test_multi_index_hashing_stops_after_one_table_when_its_bucket_alone_holds_k_copies_of_the_query():
    rng = np.random.default_rng(12)
    codes = uniform(rng, 20_000, 64)
    codes[rng.permutation(codes.shape[0])[:100]] = codes[0]
    index = MIHIndex(64)
    index.load(np.arange(codes.shape[0], dtype=np.int64), codes)
    d, _ = index.search(codes[:1], 100)
    assert (d == 0).all()
    assert index.last_stats.candidates[0] < 2 * 100, "one table's bucket read, not all three"
    assert_exact(index, codes[:1], np.arange(codes.shape[0], dtype=np.int64), codes, 100)


@pytest.mark.parametrize("bits", [16, 24, 64, 128])
def test_a_substring_key_holds_its_bits_in_order_whichever_bits_a_plan_gives_it(bits):
    rng = np.random.default_rng(bits)
    codes = uniform(rng, 2_000, bits)
    bit_matrix = np.unpackbits(codes, axis=1).astype(np.uint64)
    for m in range(max(1, -(-bits // 32)), 7):
        plan = balanced_groups(codes, m)
        expected = np.stack(
            [(bit_matrix[:, list(g)] << np.arange(len(g), dtype=np.uint64)).sum(axis=1) for g in plan.groups], axis=1
        )
        assert np.array_equal(plan.keys(codes), expected), f"{bits} bits, {m} substrings"


def test_the_index_benchmark_reports_exact_answers_for_every_code_length(tmp_path):
    out = tmp_path / "index.json"
    argv = ["bench", "index", "--source", "random", "--sizes", "3e4", "--k", "10", "100", "--index", "flat", "mih"]
    argv += ["--bits", "16", "128", "--probes", "20", "--catchup", "2000", "--quiet", "--json", str(out)]
    subprocess.run([sys.executable, "-m", "fpocmh", *argv], check=True, capture_output=True, timeout=300)
    doc = json.loads(out.read_text())
    assert doc["command"] == "fpocmh " + " ".join(argv) and doc["commit"] and doc["machine"]["cores"]
    rows = {(r["bits"], r["index"]): r for r in doc["results"]}
    assert set(rows) == {(b, i) for b in (16, 128) for i in ("flat", "mih")}
    for row in rows.values():
        assert row["k10"]["exact"] and row["k100"]["probes_equal"] == 20
        assert row["catchup_codes_per_s"] > 0 and row["restore_s"] >= 0
    assert rows[(128, "mih")]["bytes_per_code_all"] > rows[(128, "flat")]["bytes_per_code_all"]
