"""The floor under bench query's shard ratios: bare scanning processes split the codes as shards do."""

import numpy as np

from consumers.bench.scan_floor import BareLayouts, interleaved, shard_masks
from consumers.query.shards import ShardSpec


def test_each_probe_visits_every_layout_once_starting_one_further_each_time() -> None:
    visits = list(interleaved([1, 2, 4], 4))
    assert [n for i, n in visits if i == 0] == [1, 2, 4]
    assert [n for i, n in visits if i == 1] == [2, 4, 1]
    assert [n for i, n in visits if i == 3] == [1, 2, 4]
    assert len(visits) == 12


def test_every_code_belongs_to_exactly_one_shard_of_a_layout() -> None:
    ids = np.arange(1000, dtype=np.int64)
    partitions = [0, 1, 2, 3, 4, 5]
    for shards in (1, 2, 4):
        masks = shard_masks(ids, partitions, shards)
        assert np.array_equal(np.sum(masks, axis=0), np.ones(ids.size))
        for s, mine in enumerate(masks):
            owned = set(ShardSpec(s, shards).owns(partitions))
            assert {partitions[i % len(partitions)] for i in ids[mine]} == owned


def test_bare_layouts_answer_every_probe_and_stop_their_processes() -> None:
    rng = np.random.default_rng(0)
    ids = np.arange(20_000, dtype=np.int64)
    codes = rng.integers(0, 256, (ids.size, 8), dtype=np.uint8)
    with BareLayouts(ids, codes, [0, 1, 2, 3], [1, 2], k=10) as bare:
        assert [len(bare.layouts[n]) for n in (1, 2)] == [1, 2]
        for i, n in interleaved(bare.counts, 6):
            assert bare.round_trip(n, codes[i]) > 0
        workers = list(bare.workers)
    assert len(workers) == 3
    assert not any(w.is_alive() for w in workers)
