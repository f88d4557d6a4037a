"""The learner contract (fpocmh_core/learners/base.py), checked for every registered learner.

Each learner is built the way a deployment builds it, through ``bootstrap`` on a small slice of the
real benchmark, so the suite covers any learner added to the registry. A registered learner whose
module is missing fails here; nothing is skipped.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fpocmh_core.learners.base import OnlineLearner, model_from_state, published
from fpocmh_core.learners.registry import LEARNERS, learner_class, learner_from_state
from fpocmh_core.protocols import p1_chunk_records
from fpocmh_core.records import Modality
from fpocmh_core.state import ModelState

torch.set_num_threads(1)

BITS = 16
# Overrides that keep bootstrap on the slice quick. A learner not listed bootstraps with its defaults.
FAST = {
    "fpocmh": {"offline": {"epochs": 2}, "mu": 8},
    "naive": {"offline": {"epochs": 2}},
    "dlch": {"original.epochs": 2, "lifelong.epochs": 1, "lifelong.omega": 200, "lifelong.buffer_size": 64},
}


@pytest.fixture(scope="module")
def slice_rows(p1):
    return p1.offline[:400]


@pytest.fixture(scope="module")
def stream(mirflickr, p1, p1_config):
    """Two micro-batches of a real P1 chunk (unimodal arrivals, labelled at the protocol's share)."""
    records = p1_chunk_records(mirflickr, p1, p1_config, 0)[:96]
    return records[:48], records[48:]


@pytest.fixture(scope="module")
def queries(mirflickr, p1):
    return mirflickr.image[p1.query[:50]], mirflickr.text[p1.query[:50]]


_built: dict[str, bytes] = {}


def bootstrap(method: str, mirflickr, rows) -> OnlineLearner:
    return learner_class(method).bootstrap(mirflickr, rows, BITS, FAST.get(method), progress=False)


def fresh(method: str, mirflickr, rows) -> OnlineLearner:
    """A bootstrapped learner: bootstrapped once per method, then rebuilt from its exported state."""
    if method not in _built:
        _built[method] = bootstrap(method, mirflickr, rows).export_state().to_bytes()
    return learner_from_state(ModelState.from_bytes(_built[method]))


def codes_of(learner: OnlineLearner, queries) -> tuple[np.ndarray, np.ndarray]:
    return learner.encode(queries[0], Modality.IMAGE), learner.encode(queries[1], Modality.TEXT)


def same_tensors(a: ModelState, b: ModelState) -> bool:
    return a.tensors.keys() == b.tensors.keys() and all(np.array_equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


@pytest.fixture(params=sorted(LEARNERS))
def method(request) -> str:
    return request.param


def test_registered_name_matches_the_class_and_its_state(method, mirflickr, slice_rows):
    learner = bootstrap(method, mirflickr, slice_rows)
    assert type(learner) is learner_class(method) and learner.method == method
    state = learner.export_state()
    assert state.method == method and learner.version == 0
    assert "arch" in state.meta and any(k.startswith("model.") for k in state.tensors)
    assert model_from_state(state).bits == BITS == learner.bits


def test_learn_does_not_mutate_its_input_batch(method, mirflickr, slice_rows, stream):
    learner = fresh(method, mirflickr, slice_rows)
    batch = list(stream[0])
    snapshot = [
        (r.item_id, r.chunk, *(None if a is None else a.copy() for a in (r.image, r.text, r.labels))) for r in batch
    ]
    learner.learn(batch)
    assert len(batch) == len(snapshot)
    for rec, (item_id, chunk, image, text, labels) in zip(batch, snapshot, strict=True):
        assert (rec.item_id, rec.chunk) == (item_id, chunk)
        for got, want in ((rec.image, image), (rec.text, text), (rec.labels, labels)):
            assert (got is None) == (want is None) and (got is None or np.array_equal(got, want))


def test_encode_is_pure(method, mirflickr, slice_rows, stream, queries):
    learner = fresh(method, mirflickr, slice_rows)
    learner.learn(stream[0])
    before = learner.export_state()
    first = codes_of(learner, queries)
    second = codes_of(learner, queries)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == np.uint8 and a.shape == (len(queries[0]), BITS // 8)
    assert same_tensors(before, learner.export_state())


def test_export_and_import_give_identical_codes_and_an_identical_next_learn(
    method, mirflickr, slice_rows, stream, queries
):
    learner = fresh(method, mirflickr, slice_rows)
    learner.learn(stream[0])
    clone = learner_from_state(ModelState.from_bytes(learner.export_state().to_bytes()))
    assert type(clone) is type(learner)
    for a, b in zip(codes_of(learner, queries), codes_of(clone, queries), strict=True):
        np.testing.assert_array_equal(a, b)
    learner.learn(stream[1])
    clone.learn(stream[1])
    for a, b in zip(codes_of(learner, queries), codes_of(clone, queries), strict=True):
        np.testing.assert_array_equal(a, b)
    assert same_tensors(learner.export_state(), clone.export_state())


def test_same_seed_gives_identical_codes(method, mirflickr, slice_rows, stream, queries):
    first = fresh(method, mirflickr, slice_rows)
    again = bootstrap(method, mirflickr, slice_rows)
    for learner in (first, again):
        learner.learn(stream[0])
    for a, b in zip(codes_of(first, queries), codes_of(again, queries), strict=True):
        np.testing.assert_array_equal(a, b)


def test_version_bump_sets_the_parent_and_survives_a_round_trip(method, mirflickr, slice_rows):
    learner = fresh(method, mirflickr, slice_rows)
    assert learner.export_state().parent_version is None
    assert learner.bump_version() == 1
    state = learner.export_state()
    assert (state.version, state.parent_version) == (1, 0)
    learner.bump_version()
    clone = learner_from_state(ModelState.from_bytes(learner.export_state().to_bytes()))
    assert (clone.version, clone.parent_version) == (2, 1)


def test_the_published_update_encodes_like_the_learner_and_leaves_the_training_state_behind(
    method, mirflickr, slice_rows, stream, queries
):
    learner = fresh(method, mirflickr, slice_rows)
    learner.learn(stream[0])
    full = learner.export_state()
    update = ModelState.from_bytes(published(full).to_bytes())
    assert (update.version, update.parent_version, update.method) == (full.version, full.parent_version, method)
    model = model_from_state(update)
    for modality, x in zip(Modality, queries, strict=True):
        np.testing.assert_array_equal(model.encode(x, modality), learner.encode(x, modality))
    dropped = set(full.tensors) - set(update.tensors)
    assert all(name.split(".")[0] not in ("model", "bank") for name in dropped)
    assert not any(name.startswith(("optim.", "grad.", "replay.")) for name in update.tensors)
