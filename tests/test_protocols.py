"""Protocols P1 (partial-modal stream) and P2 (new categories) on the real benchmark file."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest

from fpocmh_core import config
from fpocmh_core.config import ConfigError
from fpocmh_core.protocols import P1Config, P2Config, p1_chunk_records, p1_split, p1_stream, p2_split


def arrivals(records) -> list[tuple[int, bool, bool]]:
    """What arrives and in which order, ignoring labels."""
    return [(r.item_id, r.image is not None, r.text is not None) for r in records]


# --- P1 split -----------------------------------------------------------------------------------


def test_p1_split_is_deterministic_for_a_seed_and_differs_for_another(mirflickr, p1_config):
    again = p1_split(mirflickr, p1_config)
    other = p1_split(mirflickr, dataclasses.replace(p1_config, seed=p1_config.seed + 1))
    first = p1_split(mirflickr, p1_config)
    np.testing.assert_array_equal(first.offline, again.offline)
    for a, b in zip(first.chunks, again.chunks, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first.offline, other.offline)
    assert not np.array_equal(first.chunks[0], other.chunks[0])


def test_p1_default_shares_on_the_benchmark(p1, p1_config):
    assert (p1_config.offline_share, p1_config.n_chunks) == (0.3, 10)
    assert p1.query.size == 2_000 and p1.database.size == 13_677
    assert p1.offline.size == round(0.3 * 13_677) == 4_103
    sizes = [c.size for c in p1.chunks]
    assert len(sizes) == 10 and max(sizes) - min(sizes) <= 1
    arrived = np.concatenate([p1.offline, *p1.chunks])
    assert arrived.size == p1.database.size  # no row twice ...
    np.testing.assert_array_equal(np.sort(arrived), p1.database)  # ... and none lost
    assert np.intersect1d(p1.query, p1.database).size == 0


def test_p1_seen_through_grows_chunk_by_chunk(p1):
    assert p1.seen_through(-1).size == p1.offline.size
    assert p1.seen_through(len(p1.chunks) - 1).size == p1.database.size


# --- P1 stream ----------------------------------------------------------------------------------


def test_p1_unimodal_share_one_splits_every_pair_once(mirflickr, p1, p1_config):
    cfg = dataclasses.replace(p1_config, unimodal_share=1.0)
    for chunk, records in enumerate(p1_stream(mirflickr, p1, cfg)):
        assert all(not r.is_paired for r in records)
        images = Counter(r.item_id for r in records if r.image is not None)
        texts = Counter(r.item_id for r in records if r.text is not None)
        expected = dict.fromkeys(p1.chunks[chunk].tolist(), 1)
        assert images == expected and texts == expected


def test_p1_unimodal_share_half_splits_exactly_half_the_pairs(mirflickr, p1, p1_config):
    cfg = dataclasses.replace(p1_config, unimodal_share=0.5)
    rows = p1.chunks[3]
    records = p1_chunk_records(mirflickr, p1, cfg, 3)
    n_split = round(0.5 * rows.size)
    assert sum(r.is_paired for r in records) == rows.size - n_split
    assert sum(not r.is_paired for r in records) == 2 * n_split
    # every pair still delivers its image once and its text once
    assert Counter(r.item_id for r in records if r.image is not None) == dict.fromkeys(rows.tolist(), 1)
    assert Counter(r.item_id for r in records if r.text is not None) == dict.fromkeys(rows.tolist(), 1)


def test_p1_records_carry_the_rows_features(mirflickr, p1, p1_config):
    for r in p1_chunk_records(mirflickr, p1, p1_config, 0)[:50]:
        features = r.image if r.image is not None else r.text
        source = mirflickr.image if r.image is not None else mirflickr.text
        np.testing.assert_array_equal(features, source[r.item_id])


@pytest.mark.parametrize("share", [0.0, 0.3, 1.0])
def test_p1_label_share_is_exact(mirflickr, p1, p1_config, share):
    records = p1_chunk_records(mirflickr, p1, dataclasses.replace(p1_config, label_share=share), 0)
    labelled = [r for r in records if r.labels is not None]
    assert len(labelled) == round(share * len(records))
    for r in labelled:
        np.testing.assert_array_equal(r.labels, mirflickr.labels[r.item_id])


def test_p1_label_share_does_not_reshuffle_arrivals(mirflickr, p1, p1_config):
    def chunk(share: float):
        return p1_chunk_records(mirflickr, p1, dataclasses.replace(p1_config, label_share=share), 2)

    low, high = chunk(0.3), chunk(0.6)
    assert arrivals(low) == arrivals(high)
    # more labels add to the labelled arrivals rather than drawing a new set
    labelled = [i for i, r in enumerate(low) if r.labels is not None]
    assert all(high[i].labels is not None for i in labelled)


def test_p1_stream_shares_do_not_move_the_offline_chunk_split(mirflickr, p1, p1_config):
    other = p1_split(mirflickr, dataclasses.replace(p1_config, unimodal_share=0.2, label_share=0.0))
    np.testing.assert_array_equal(other.offline, p1.offline)
    for a, b in zip(other.chunks, p1.chunks, strict=True):
        np.testing.assert_array_equal(a, b)


def test_p1_no_chunk_replays_the_draws_of_another_seeds_chunk(mirflickr, p1_config):
    """Seed s, chunk c+1 and seed s+1, chunk c must draw independently (equal chunk sizes here)."""
    cfg0 = dataclasses.replace(p1_config, unimodal_share=0.5)
    cfg1 = dataclasses.replace(cfg0, seed=cfg0.seed + 1)
    split0, split1 = p1_split(mirflickr, cfg0), p1_split(mirflickr, cfg1)
    assert split0.chunks[1].size == split1.chunks[0].size
    pattern0 = [(a, b) for _, a, b in arrivals(p1_chunk_records(mirflickr, split0, cfg0, 1))]
    pattern1 = [(a, b) for _, a, b in arrivals(p1_chunk_records(mirflickr, split1, cfg1, 0))]
    assert pattern0 != pattern1


# --- P2 -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def p2_config() -> P2Config:
    return config.load(P2Config, "p2")


def test_p2_new_labels_are_tree_and_water(mirflickr, p2_config):
    split = p2_split(mirflickr, p2_config)
    assert split.new_label_columns == (22, 23)
    assert [mirflickr.label_names[c] for c in split.new_label_columns] == ["tree", "water"]
    np.testing.assert_array_equal(split.seen_label_columns, np.arange(22))


def test_p2_seen_items_carry_no_new_label_and_increment_items_do(mirflickr, p2_config):
    split = p2_split(mirflickr, p2_config)
    new = list(split.new_label_columns)
    assert not mirflickr.labels[split.seen][:, new].any()
    for inc in split.increments:
        assert inc.size > 0 and mirflickr.labels[inc][:, new].any(axis=1).all()
    everything = np.concatenate([split.seen, *split.increments])
    assert everything.size == split.database_through(len(split.increments) - 1).size
    np.testing.assert_array_equal(np.sort(everything), np.flatnonzero(mirflickr.split == 0))


def test_p2_three_increments_split_evenly_and_deterministically(mirflickr, p2_config):
    cfg = config.load(P2Config, "p2", overrides=config.parse_overrides(["increments=3"]))
    one, three, again = p2_split(mirflickr, p2_config), p2_split(mirflickr, cfg), p2_split(mirflickr, cfg)
    sizes = [inc.size for inc in three.increments]
    assert len(sizes) == 3 and max(sizes) - min(sizes) <= 1
    for a, b in zip(three.increments, again.increments, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(np.sort(np.concatenate(three.increments)), one.increments[0])
    np.testing.assert_array_equal(three.seen, one.seen)


# --- configuration errors -----------------------------------------------------------------------


@pytest.mark.parametrize("key", ["offline_share", "unimodal_share", "label_share"])
@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_a_share_outside_0_1_names_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"{key} must be within \[0, 1\], got {value}"):
        config.load(P1Config, "p1", overrides={key: value})


def test_an_unknown_key_in_a_yaml_override_is_named(tmp_path):
    user = tmp_path / "p1.yaml"
    user.write_text("label_share: 0.5\nlabel_shares: 0.5\n")
    with pytest.raises(ConfigError, match="unknown key 'label_shares'") as err:
        config.load(P1Config, "p1", user)
    assert str(user) in str(err.value)
