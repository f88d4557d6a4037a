"""The reservoir of items with their stored codes (fpocmh_core/learners/reservoir.py), on small arrays."""

from __future__ import annotations

import numpy as np

from fpocmh_core.learners.reservoir import CodeReservoir
from fpocmh_core.records import Modality

IMG, TXT = Modality.IMAGE, Modality.TEXT
BITS = 8


def code_of(i: int) -> np.ndarray:
    """A distinct +-1 code per small integer (its binary digits), so a slot tells which item it holds."""
    return np.array([1 if (i >> b) & 1 else -1 for b in range(BITS)], np.float32)


def held(reservoir: CodeReservoir, modality: Modality) -> list[int]:
    codes = reservoir.codes[modality][: reservoir.size(modality)]
    return sorted(int(((c > 0) * (1 << np.arange(BITS))).sum()) for c in codes)


def filled(capacity: int, n: int, seed: int = 0, **kwargs) -> CodeReservoir:
    reservoir = CodeReservoir(capacity, BITS, n_categories=4, seed=seed, **kwargs)
    for i in range(n):
        reservoir.add(IMG, i, code_of(i), [i % 4], np.full(3, i, np.float32) if kwargs.get("dims") else None)
    return reservoir


def test_the_first_items_fill_the_slots_in_arrival_order():
    reservoir = filled(capacity=10, n=6)
    assert reservoir.size(IMG) == 6 and reservoir.size(TXT) == 0
    assert held(reservoir, IMG) == list(range(6))
    np.testing.assert_array_equal(reservoir.categories[IMG][:6].argmax(axis=1), [0, 1, 2, 3, 0, 1])


def test_a_full_reservoir_keeps_its_size_and_a_uniform_sample_of_everything_offered():
    reservoir = filled(capacity=100, n=255)
    kept = held(reservoir, IMG)
    assert reservoir.size(IMG) == 100 and reservoir.seen[IMG] == 255 and len(set(kept)) == 100
    # Uniform: each third of the stream holds about a third of the sample (binomial sd ~4.7 of 33).
    thirds = np.bincount(np.asarray(kept) // 85, minlength=3)
    assert all(18 <= t <= 48 for t in thirds), thirds


def test_the_sample_depends_only_on_the_seed_and_the_items():
    assert held(filled(20, 200, seed=3), IMG) == held(filled(20, 200, seed=3), IMG)
    assert held(filled(20, 200, seed=3), IMG) != held(filled(20, 200, seed=4), IMG)


def test_sample_draws_slots_by_key_and_marks_the_rows_that_share_a_category():
    reservoir = filled(capacity=16, n=16)
    codes, related = reservoir.sample(IMG, key=7, n=32, categories=[1, 2])
    again, _ = reservoir.sample(IMG, key=7, n=32, categories=[1, 2])
    other, _ = reservoir.sample(IMG, key=8, n=32, categories=[1, 2])
    np.testing.assert_array_equal(codes, again)
    assert not np.array_equal(codes, other)
    ids = ((codes > 0) * (1 << np.arange(BITS))).sum(axis=1)
    np.testing.assert_array_equal(related, np.isin(ids % 4, [1, 2]).astype(np.float32))


def test_an_empty_modality_samples_zero_codes_marked_unrelated():
    codes, related = filled(capacity=4, n=4).sample(TXT, key=0, n=5, categories=[0])
    assert codes.shape == (5, BITS) and not codes.any() and not related.any()


def test_features_are_kept_only_when_asked_for_and_follow_their_codes():
    assert filled(capacity=4, n=9).features == {}
    reservoir = filled(capacity=4, n=9, dims={IMG: 3, TXT: 3})
    feats, codes = reservoir.rehearsal(IMG, np.arange(4))
    ids = ((codes > 0) * (1 << np.arange(BITS))).sum(axis=1)
    np.testing.assert_array_equal(feats[:, 0], ids)


def test_tensors_round_trip_and_the_copy_continues_identically():
    for dims in (None, {IMG: 3, TXT: 3}):
        reservoir = filled(capacity=8, n=13, seed=5, dims=dims)
        copy = CodeReservoir.from_tensors({k.removeprefix("r."): v for k, v in reservoir.tensors("r").items()}, seed=5)
        for each in (reservoir, copy):
            for i in range(13, 40):
                each.add(IMG, i, code_of(i), [i % 4], np.full(3, i, np.float32))
        assert held(reservoir, IMG) == held(copy, IMG) and copy.seen == reservoir.seen
        np.testing.assert_array_equal(copy.ids[IMG], reservoir.ids[IMG])
        np.testing.assert_array_equal(copy.categories[IMG], reservoir.categories[IMG])
        assert (copy.features == {}) == (dims is None)


def test_a_slot_knows_its_item_and_takes_a_newer_code_of_that_item_only():
    reservoir = CodeReservoir(2, BITS, n_categories=4, seed=0)
    slot = reservoir.add(IMG, 7, code_of(7), [0])
    assert slot == 0 and reservoir.ids[IMG][slot] == 7
    assert reservoir.replace_code(IMG, slot, 7, code_of(9))
    assert held(reservoir, IMG) == [9], "the slot holds the item's newer code"
    assert not reservoir.replace_code(IMG, slot, 8, code_of(3)), "another item's code never lands in it"
    # Once a later item has taken the slot, a code of the earlier one no longer lands there.
    taken = next(i for i in range(2, 100) if reservoir.add(IMG, i, code_of(i), [0]) == slot)
    assert not reservoir.replace_code(IMG, slot, 7, code_of(5))
    assert int(reservoir.ids[IMG][slot]) == taken


def test_an_item_left_out_of_a_full_reservoir_gets_no_slot():
    reservoir = filled(capacity=4, n=4)
    slots = [reservoir.add(IMG, i, code_of(i), [0]) for i in range(4, 60)]
    assert None in slots and all(s is None or 0 <= s < 4 for s in slots)


def test_a_reservoir_saved_before_slots_kept_ids_loads_with_no_id_known():
    tensors = {k.removeprefix("r."): v for k, v in filled(capacity=4, n=3).tensors("r").items() if ".id." not in k}
    old = CodeReservoir.from_tensors(tensors, seed=0)
    assert (old.ids[IMG] == -1).all() and held(old, IMG) == [0, 1, 2]
    assert not old.replace_code(IMG, 0, 0, code_of(5)), "no id known: nothing replaced"
