"""Protocol P3 (new categories arriving late in a partial-modal stream) and every protocol as a stream,
on the real benchmark file."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest

from fpocmh_core import config
from fpocmh_core.config import ConfigError
from fpocmh_core.data import CrossModalDataset, DatasetError
from fpocmh_core.protocols import P3Config, load_stream, p3_split


@pytest.fixture(scope="module")
def p3_config() -> P3Config:
    return config.load(P3Config, "p3")


def carries_new(ds: CrossModalDataset, rows: np.ndarray, columns: tuple[int, ...]) -> np.ndarray:
    return ds.labels[rows][:, list(columns)].any(axis=1)


def test_p3_new_items_arrive_only_in_the_late_chunks_and_every_item_arrives_once(mirflickr, p3_config):
    split = p3_split(mirflickr, p3_config)
    assert [mirflickr.label_names[c] for c in split.new_label_columns] == ["tree", "water"]
    early = p3_config.n_chunks - p3_config.new_chunks
    assert not carries_new(mirflickr, split.offline, split.new_label_columns).any()
    for chunk in split.chunks[:early]:
        assert chunk.size and not carries_new(mirflickr, chunk, split.new_label_columns).any()
    late_new = [carries_new(mirflickr, chunk, split.new_label_columns) for chunk in split.chunks[early:]]
    # mixed (the default): every late chunk holds new items and seen items
    assert all(mask.any() and not mask.all() for mask in late_new)
    arrived = np.concatenate([split.offline, *split.chunks])
    assert arrived.size == split.database.size == 13_677
    np.testing.assert_array_equal(np.sort(arrived), split.database)
    assert split.offline.size == round(p3_config.offline_share * 13_677)
    assert sum(int(mask.sum()) for mask in late_new) == carries_new(mirflickr, split.database, (22, 23)).sum()


def test_p3_alone_puts_the_new_items_after_every_seen_item(mirflickr, p3_config):
    cfg = dataclasses.replace(p3_config, new_items="alone", new_chunks=2)
    split = p3_split(mirflickr, cfg)
    for chunk in split.chunks[:-2]:
        assert not carries_new(mirflickr, chunk, split.new_label_columns).any()
    for chunk in split.chunks[-2:]:
        assert carries_new(mirflickr, chunk, split.new_label_columns).all()


def test_p3_query_new_marks_the_queries_that_carry_a_new_label(mirflickr, p3_config):
    split = p3_split(mirflickr, p3_config)
    np.testing.assert_array_equal(split.query_new, carries_new(mirflickr, split.query, (22, 23)))
    assert 0 < split.query_new.sum() < split.query.size


def test_p3_is_deterministic_for_a_seed_and_differs_for_another(mirflickr, p3_config):
    first, again = p3_split(mirflickr, p3_config), p3_split(mirflickr, p3_config)
    other = p3_split(mirflickr, dataclasses.replace(p3_config, seed=1))
    np.testing.assert_array_equal(first.offline, again.offline)
    for a, b in zip(first.chunks, again.chunks, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first.offline, other.offline)
    assert not np.array_equal(first.chunks[-1], other.chunks[-1])


def test_p3_arrivals_follow_the_unimodal_and_label_shares_as_in_p1(mirflickr):
    stream = load_stream(mirflickr, "p3", {"unimodal_share": 1.0, "label_share": 0.25})
    last = len(stream.split.chunks) - 1
    records = stream.chunk_records(mirflickr, last)
    rows = stream.split.chunks[last]
    assert all(not r.is_paired for r in records) and {r.chunk for r in records} == {last}
    assert Counter(r.item_id for r in records if r.image is not None) == dict.fromkeys(rows.tolist(), 1)
    assert Counter(r.item_id for r in records if r.text is not None) == dict.fromkeys(rows.tolist(), 1)
    assert sum(r.labels is not None for r in records) == round(0.25 * len(records))


def test_a_dataset_without_a_new_label_is_an_error_naming_it_and_the_labels(mirflickr, p3_config):
    cfg = dataclasses.replace(p3_config, new_labels=("tree", "lava"))
    with pytest.raises(DatasetError, match=r"p3: new label\(s\) lava not in .*its labels: animals, baby, .*water"):
        p3_split(mirflickr, cfg)


def test_an_offline_share_larger_than_the_seen_items_is_an_error(mirflickr, p3_config):
    with pytest.raises(DatasetError, match="does not fit in the 9692 items without a new label"):
        p3_split(mirflickr, dataclasses.replace(p3_config, offline_share=0.9))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("new_chunks", 10, "new_chunks must be >= 1 and below n_chunks"),
        ("new_chunks", 0, "new_chunks must be >= 1 and below n_chunks"),
        ("new_items", "late", "new_items must be one of mixed, alone"),
        ("label_share", 1.5, r"label_share must be within \[0, 1\]"),
        ("new_labels", [], "new_labels must name at least one label"),
    ],
)
def test_p3_config_errors_name_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message):
        config.load(P3Config, "p3", overrides={key: value})


def test_p2_as_a_stream_has_the_seen_items_offline_and_paired_labelled_increments(mirflickr):
    stream = load_stream(mirflickr, "p2", {"increments": 2})
    split = stream.split
    assert not carries_new(mirflickr, split.offline, split.new_label_columns).any()
    assert len(split.chunks) == 2
    assert all(carries_new(mirflickr, chunk, split.new_label_columns).all() for chunk in split.chunks)
    records = stream.chunk_records(mirflickr, 1)
    assert sorted(r.item_id for r in records) == split.chunks[1].tolist()
    assert all(r.is_paired and r.labels is not None and r.chunk == 1 for r in records)


def test_p1_as_a_stream_is_the_p1_split_with_no_new_labels(mirflickr, p1):
    stream = load_stream(mirflickr, "p1")
    np.testing.assert_array_equal(stream.split.offline, p1.offline)
    assert stream.split.new_label_columns == () and not stream.split.query_new.any()


def test_an_unknown_protocol_is_named():
    with pytest.raises(ConfigError, match="unknown protocol 'p4'; known: p1, p2, p3"):
        load_stream(None, "p4")  # type: ignore[arg-type]
