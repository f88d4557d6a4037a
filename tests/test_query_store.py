"""The compact store, the shard merge and snapshots, in process: exact (distance, id) answers, ties
included, on codes of the real benchmark and on small arrays built to tie."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pipeline_support import model_state

from consumers.query.shards import ShardAnswers, ShardSpec, merge_topk
from consumers.query.snapshots import SnapshotDir
from consumers.query.store import CodeStore
from fpocmh_core import codes as codes_mod
from fpocmh_core import schemas
from fpocmh_core.hamming import FlatIndex
from fpocmh_core.hamming import flat as flat_index
from fpocmh_core.learners.base import model_from_state
from fpocmh_core.records import Modality


def reference_topk(q, ids, codes, k):
    """The definition: all distances, ordered by (distance, item id), first k."""
    dist = codes_mod.hamming(q, codes)
    order = np.lexsort((np.broadcast_to(ids, dist.shape), dist), axis=1)[:, :k]
    return np.take_along_axis(dist, order, 1), ids[order]


@pytest.fixture(scope="module")
def benchmark_codes(mirflickr):
    """64-bit text codes of every benchmark item and image-query codes, from an (untrained) hash model."""
    model = model_from_state(model_state(mirflickr.dims, 64))
    db = model.encode(mirflickr.text, Modality.TEXT)
    q = model.encode(mirflickr.image[:20], Modality.IMAGE)
    ids = np.random.default_rng(1).permutation(10 * len(db))[: len(db)].astype(np.int64)
    return ids, db, q


def tie_heavy(n, seed, nbytes=1):
    """8-bit codes: thousands of items share every distance, so ties decide most of a top-k."""
    rng = np.random.default_rng(seed)
    ids = rng.permutation(4 * n)[:n].astype(np.int64)
    return ids, rng.integers(0, 256, (n, nbytes), dtype=np.uint8), rng.integers(0, 256, (5, nbytes), dtype=np.uint8)


def filled(ids, codes, bits, batch=997):
    store = FlatIndex(bits)
    for i in range(0, ids.size, batch):
        store.upsert(ids[i : i + batch], codes[i : i + batch])
    return store


@pytest.mark.parametrize("k", [1, 10, 100, 1000])
def test_the_store_answers_the_definition_exactly_on_benchmark_codes(benchmark_codes, k):
    ids, db, q = benchmark_codes
    dist, got = filled(ids, db, 64).search(q, k)
    want_dist, want_ids = reference_topk(q, ids, db, k)
    np.testing.assert_array_equal(dist, want_dist)
    np.testing.assert_array_equal(got, want_ids)


@pytest.mark.parametrize("bits", [8, 16, 64])
def test_ties_are_broken_by_item_id_across_the_delta_and_the_main_segment(monkeypatch, bits):
    monkeypatch.setattr(flat_index, "MIN_DELTA_ROWS", 500)
    ids, codes, q = tie_heavy(6000, seed=bits, nbytes=bits // 8)
    if bits == 64:
        codes[:, :6] = 0  # 16 random bits in a 64-bit code
    store = filled(ids, codes, bits)
    assert 0 < store._delta_ids.size < len(store), "both segments hold codes"
    for k in (1, 3, 50, 256, 257, 700):  # the heap search up to 256, the counting search above
        dist, got = store.search(q, k)
        want_dist, want = reference_topk(q, ids, codes, k)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(dist, want_dist)


def test_an_upsert_replaces_the_old_code_which_is_never_searched_again():
    ids, codes, q = tie_heavy(3000, seed=3)
    store = filled(ids, codes, 8)
    newer = codes.copy()
    newer[::3] ^= 0xFF  # a third of the items get new codes
    store.upsert(ids[::3], newer[::3])
    # Twice in one batch: the later row wins.
    store.upsert(np.array([ids[1], ids[1]]), np.array([[0], [255]], np.uint8))
    newer[1] = 255
    assert len(store) == 3000
    np.testing.assert_array_equal(store.search(q, 3000)[1], reference_topk(q, ids, newer, 3000)[1])


def test_shards_merge_to_the_single_store_answer_with_ties_k_above_a_shard_and_empty_shards():
    ids, codes, q = tie_heavy(2000, seed=4)
    single = filled(ids, codes, 8)
    for count in (2, 3, 5):
        # Shard by item id, as partitions split keys; with 5 shards over a 3-way split two stay empty.
        owner = ids % min(count, 3)
        shards = [filled(ids[owner == s], codes[owner == s], 8) for s in range(count)]
        assert any(len(s) == 0 for s in shards) == (count == 5)
        for k in (1, 20, 900, 2500):  # 900 and 2500 exceed what one shard holds
            parts = [s.search(q, k) for s in shards]
            dist, merged = merge_topk(parts, k, q.shape[0])
            want_dist, want = single.search(q, k)
            np.testing.assert_array_equal(merged, want)
            np.testing.assert_array_equal(dist, want_dist)


def shard_result(spec, status="ok", ids=None, dist=None, version=0):
    ids = np.zeros((1, 0), np.int64) if ids is None else ids
    dist = np.zeros(ids.shape, np.int32) if dist is None else dist
    return schemas.QueryResult("c", status, ids, dist, version, (1, 2), 0.001, "", spec.index, spec.count, ((0, 5),))


def test_shard_answers_are_complete_with_every_shard_and_partial_without_one():
    answers = ShardAnswers()
    answers.add(shard_result(ShardSpec(0, 2), ids=np.array([[4, 9]]), dist=np.array([[1, 3]])))
    assert not answers.complete and answers.missing == [1]
    partial = answers.merged(10)
    assert partial.status == "partial" and "no answer from shard(s) 1 of 2" in partial.error
    assert partial.ids.tolist() == [[4, 9]]
    answers.add(shard_result(ShardSpec(1, 2), ids=np.array([[2, 7]]), dist=np.array([[1, 2]])))
    merged = answers.merged(3)
    assert answers.complete and merged.status == "ok"
    assert merged.ids.tolist() == [[2, 4, 7]] and merged.distances.tolist() == [[1, 1, 2]]
    assert merged.store_codes == (2, 4) and merged.shard is None and merged.shard_count == 2


def test_a_shard_behind_its_bound_makes_the_merged_answer_behind():
    answers = ShardAnswers()
    answers.add(shard_result(ShardSpec(0, 2)))
    answers.add(schemas.QueryResult("c", "behind", np.zeros((1, 0)), np.zeros((1, 0)), 0, (0, 0), 0, "late", 1, 2))
    merged = answers.merged(5)
    assert merged.status == "behind" and "shard 1/2: late" in merged.error


def test_shard_specs_parse_and_split_partitions():
    assert ShardSpec.parse("1/3").owns(range(8)) == [1, 4, 7]
    assert ShardSpec.parse("0/1").owns(range(3)) == [0, 1, 2]
    assert ShardSpec(1, 2).group("fpocmh-query") == "fpocmh-query-s1of2"
    assert ShardSpec().group("fpocmh-query") == "fpocmh-query"
    for bad in ("2/2", "1", "a/b", "0/0"):
        with pytest.raises(ValueError):
            ShardSpec.parse(bad)


def test_shards_answer_on_consecutive_reply_partitions_and_by_key_when_none_was_asked():
    assert [ShardSpec(s, 4).reply_partition(2, 4) for s in range(4)] == [2, 3, 0, 1]
    assert [ShardSpec(s, 4).reply_partition(1, 2) for s in range(4)] == [1, 0, 1, 0], "fewer partitions than shards"
    assert ShardSpec().reply_partition(3, 4) == 3
    assert ShardSpec(1, 2).reply_partition(-1, 4) == -1


# ------------------------------------------------------------------------------------------ snapshots


def small_store(seed=5):
    store = CodeStore(64)
    rng = np.random.default_rng(seed)
    for m in Modality:
        store.upsert(rng.permutation(5000)[:1200], rng.integers(0, 256, (1200, 8), dtype=np.uint8), m)
    return store


def same_store(a, b):
    for m in Modality:
        for x, y in zip(a.codes(m), b.codes(m), strict=True):
            np.testing.assert_array_equal(x, y)


def test_a_snapshot_loads_back_exactly_with_its_offsets_and_model_versions(tmp_path):
    snaps = SnapshotDir(tmp_path, "codes", [1, 3], 64)
    store = small_store()
    snaps.write(store, {1: 700, 3: 1700}, {0, 2})
    loaded = CodeStore(64)
    snap = snaps.load_newest(loaded)
    assert snap.offsets == {1: 700, 3: 1700} and snap.model_versions == (0, 2)
    same_store(store, loaded)


def test_the_newest_of_kept_snapshots_wins_and_older_ones_are_removed(tmp_path):
    snaps = SnapshotDir(tmp_path, "codes", [0], 64, keep=2)
    # Falling offsets, as after a reset codes topic: the newest snapshot still wins.
    for offset in (30, 20, 10):
        snaps.write(small_store(offset), {0: offset}, {0})
    assert len(snaps.snapshots()) == 2
    loaded = CodeStore(64)
    assert snaps.load_newest(loaded).offsets == {0: 10}
    same_store(small_store(10), loaded)


def test_a_corrupt_snapshot_is_ignored_with_a_log_line_and_the_older_one_loads(tmp_path, caplog):
    snaps = SnapshotDir(tmp_path, "codes", [0], 64)
    snaps.write(small_store(1), {0: 100}, {0})
    newest = snaps.write(small_store(2), {0: 200}, {0})
    codes_file = newest / "txt" / "codes.npy"
    raw = bytearray(codes_file.read_bytes())
    raw[-5] ^= 0x01  # one flipped bit
    codes_file.write_bytes(bytes(raw))
    loaded = CodeStore(64)
    assert snaps.load_newest(loaded).offsets == {0: 100}
    same_store(small_store(1), loaded)
    assert "ignored" in caplog.text and "txt/codes.npy" in caplog.text


@pytest.mark.parametrize(
    "field,value", [("bits", 32), ("topic", "other.codes"), ("partitions", [0, 2]), ("format", "x/9")]
)
def test_a_foreign_snapshot_is_never_loaded(tmp_path, caplog, field, value):
    snaps = SnapshotDir(tmp_path, "codes", [0], 64)
    path = snaps.write(small_store(), {0: 100}, {0})
    meta = json.loads((path / "meta.json").read_text())
    meta[field] = value
    (path / "meta.json").write_text(json.dumps(meta))
    loaded = CodeStore(64)
    assert snaps.load_newest(loaded) is None
    assert loaded.counts == (0, 0)
    assert "ignored" in caplog.text


def test_an_unfinished_snapshot_folder_is_not_a_snapshot(tmp_path):
    snaps = SnapshotDir(tmp_path, "codes", [0], 64)
    (tmp_path / ".tmp-dead").mkdir()
    assert snaps.load_newest(CodeStore(64)) is None


@pytest.mark.parametrize("bits", [16, 64, 128])
def test_a_multi_index_store_answers_what_the_flat_store_answers_through_upserts_and_a_snapshot(tmp_path, bits):
    rng = np.random.default_rng(bits)
    n = 30_000
    # Skewed bits, as learned codes have: most are 0, a few carry the information.
    codes = np.packbits((rng.random((n, bits)) < rng.uniform(0.05, 0.5, bits)).astype(np.uint8), axis=1)
    ids = rng.permutation(4 * n)[:n].astype(np.int64)
    q = codes[rng.integers(0, n, 25)] ^ rng.integers(0, 2, (25, bits // 8), dtype=np.uint8)
    stores = [CodeStore(bits, kind) for kind in ("flat", "mih")]
    newer = codes[::4] ^ 0x0F
    for store in stores:
        for i in range(0, n, 4999):
            store.upsert(ids[i : i + 4999], codes[i : i + 4999], Modality.TEXT)
        store.upsert(ids[::4], newer, Modality.TEXT)  # a quarter superseded: the old codes leave the index
    for k in (1, 10, 100, 1000):
        flat, mih = (store.search(q, Modality.TEXT, k) for store in stores)
        np.testing.assert_array_equal(mih[0], flat[0])
        np.testing.assert_array_equal(mih[1], flat[1])
    snaps = SnapshotDir(tmp_path, "codes", [0], bits)
    snaps.write(stores[1], {0: n}, {0})
    restored = CodeStore(bits, "mih")
    snaps.load_newest(restored)
    same_store(stores[0], restored)
    np.testing.assert_array_equal(restored.search(q, Modality.TEXT, 100)[1], stores[0].search(q, Modality.TEXT, 100)[1])


@pytest.mark.parametrize(("written_by", "read_by"), [("flat", "mih"), ("mih", "flat")])
def test_a_shard_switched_to_another_index_kind_builds_its_own_from_the_snapshot(tmp_path, written_by, read_by):
    snaps = SnapshotDir(tmp_path, "codes", [0], 64)
    written = CodeStore(64, written_by)
    for m in Modality:
        written.modal[m].load(*small_store().codes(m))
    snaps.write(written, {0: 1200}, {0})
    loaded = CodeStore(64, read_by)
    assert snaps.load_newest(loaded).offsets == {0: 1200}
    assert all(loaded.modal[m].kind == read_by for m in Modality)
    same_store(small_store(), loaded)
