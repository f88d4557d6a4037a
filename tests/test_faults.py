"""Bad input and faults, in process: the arrival check, the learner's rollback, the model check.

Each case is one that reached a model or a stored code before these checks existed (issue: "Bad input
and faults never reach the write-once database"); the pipeline-level behaviour (dead letters, roles
that keep running) is in ``test_faults_pipeline.py``.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fpocmh_core import schemas
from fpocmh_core.learners.fpocmh import FpocmhLearner
from fpocmh_core.learners.guard import GuardedLearner, NonFiniteStep
from fpocmh_core.learners.registry import learner_from_state
from fpocmh_core.model_check import ModelCheckConfig, Probe, model_problems
from fpocmh_core.protocols import p1_chunk_records
from fpocmh_core.records import ItemRecord, Modality
from fpocmh_core.validation import MAX_ITEM_ID, ArrivalCheck, check_query_features

CHECK = ModelCheckConfig(probe_items=256, min_distinct_share=0.2, max_constant_bit_share=0.5)


@pytest.fixture(scope="module")
def arrivals(mirflickr):
    return ArrivalCheck(*mirflickr.dims, n_labels=mirflickr.n_labels)


def item(ds, row=0, **changes):
    base = {"item_id": row, "image": ds.image[row].copy(), "text": ds.text[row].copy(), "labels": ds.labels[row]}
    return ItemRecord(**{**base, **changes})


def reason_of(check, record):
    with pytest.raises(schemas.SchemaError) as err:
        check.check(record)
    return err.value.reason, err.value.detail


def test_a_real_arrival_passes_the_check_unchanged(mirflickr, arrivals):
    record = item(mirflickr, 5)
    assert arrivals.check(record) is record


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_features_are_invalid_in_either_modality(mirflickr, arrivals, bad):
    image = mirflickr.image[0].copy()
    image[3] = bad
    assert reason_of(arrivals, item(mirflickr, image=image))[0] == "invalid"
    text = mirflickr.text[0].astype(np.float64)
    text[-1] = bad
    reason, detail = reason_of(arrivals, item(mirflickr, text=text))
    assert reason == "invalid" and "txt" in detail


def test_a_value_finite_in_float64_but_infinite_in_float32_is_invalid(mirflickr, arrivals):
    image = mirflickr.image[0].astype(np.float64)
    image[0] = 1e300
    assert reason_of(arrivals, item(mirflickr, image=image))[0] == "invalid"


def test_large_finite_float32_features_pass_even_where_their_squares_overflow(mirflickr, arrivals):
    image = mirflickr.image[0].copy()
    image[:4] = [3e38, -3e38, 1e30, 1e20]
    assert arrivals.check(item(mirflickr, image=image)).image is image


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_half_precision_features_are_invalid(mirflickr, arrivals, bad):
    image = mirflickr.image[0].astype(np.float16)
    image[-1] = bad
    assert reason_of(arrivals, item(mirflickr, image=image))[0] == "invalid"


def test_feature_lengths_must_match_the_model(mirflickr, arrivals):
    reason, detail = reason_of(arrivals, item(mirflickr, image=np.zeros(mirflickr.dims[0] + 1, np.float32)))
    assert reason == "shape" and str(mirflickr.dims[0]) in detail


def test_labels_must_have_the_dataset_count_and_be_zero_or_one(mirflickr, arrivals):
    assert reason_of(arrivals, item(mirflickr, labels=np.ones(mirflickr.n_labels + 1, np.uint8)))[0] == "shape"
    twos = mirflickr.labels[0].astype(np.float32) * 2
    assert reason_of(arrivals, item(mirflickr, labels=twos))[0] == "invalid"
    nan = mirflickr.labels[0].astype(np.float32)
    nan[0] = np.nan
    assert reason_of(arrivals, item(mirflickr, labels=nan))[0] == "invalid"
    byte_two = mirflickr.labels[0].astype(np.uint8)
    byte_two[-1] = 2
    assert reason_of(arrivals, item(mirflickr, labels=byte_two))[0] == "invalid"
    assert arrivals.check(item(mirflickr, labels=mirflickr.labels[0].astype(bool))) is not None


@pytest.mark.parametrize("item_id", [-1, MAX_ITEM_ID + 1])
def test_item_ids_outside_the_range_are_invalid_so_the_answer_padding_id_is_never_stored(mirflickr, arrivals, item_id):
    assert reason_of(arrivals, item(mirflickr, item_id=item_id))[0] == "invalid"


def test_query_features_with_non_finite_rows_or_wrong_widths_are_named():
    q = np.ones((3, 8), np.float32)
    assert check_query_features(q, 8) is None
    q[1, 2] = np.nan
    reason, detail = check_query_features(q, 8)
    assert reason == "invalid" and "[1]" in detail
    reason, detail = check_query_features(np.ones((2, 8), np.float32), 9)
    assert reason == "shape" and "takes 9" in detail


# ------------------------------------------------------------------------------------------ the learner


@pytest.fixture(scope="module")
def tiny_learner(mirflickr, p1):
    return FpocmhLearner.bootstrap(mirflickr, p1.offline[:400], 32, {"offline": {"epochs": 1}}, progress=False)


def clone(learner):
    return learner_from_state(learner.export_state())


def poisoned(record: ItemRecord) -> ItemRecord:
    """What an arrival with NaN features did before the check: the learner got it as it was."""
    features = np.full_like(record.features(record.modalities[0]), np.nan)
    if record.modalities[0] is Modality.IMAGE:
        return ItemRecord(record.item_id, features, record.text, record.labels, record.chunk)
    return ItemRecord(record.item_id, record.image, features, record.labels, record.chunk)


def test_a_batch_that_makes_the_learner_non_finite_is_rolled_back_exactly(tiny_learner, mirflickr, p1, p1_config):
    stream = p1_chunk_records(mirflickr, p1, p1_config, 0)[:200]
    good, later = stream[:100], stream[100:]
    reference = clone(tiny_learner)
    reference.learn(good)
    reference.learn(later)

    guard = GuardedLearner(clone(tiny_learner))
    guard.learn(good)
    before = {k: v.copy() for k, v in guard.learner.export_state().tensors.items()}
    with pytest.raises(NonFiniteStep):
        guard.learn([*later[:10], poisoned(later[10]), *later[11:40]])
    after = guard.learner.export_state().tensors
    assert guard.rollbacks == 1
    assert all(np.array_equal(before[k], after[k], equal_nan=True) for k in before), "bank, optimiser, RNG included"
    guard.learn(later)
    q = mirflickr.image[p1.query[:50]]
    np.testing.assert_array_equal(
        guard.learner.encode(q, Modality.IMAGE), reference.encode(q, Modality.IMAGE), "as if the bad batch never came"
    )


def test_learning_that_raises_leaves_the_learner_as_it_was(tiny_learner, mirflickr, p1, p1_config):
    guard = GuardedLearner(clone(tiny_learner))
    wrong = ItemRecord(1, np.zeros(3, np.float32), None, None, 0)  # a length the network can't take
    with pytest.raises(ValueError):
        guard.learn([*p1_chunk_records(mirflickr, p1, p1_config, 0)[:20], wrong])
    assert guard.rollbacks == 1
    assert all(bool(torch.isfinite(p).all()) for p in guard.learner.model.parameters())


# ------------------------------------------------------------------------------------- the model check


@pytest.fixture(scope="module")
def probe(mirflickr, p1):
    rows = p1.offline
    return Probe.draw(mirflickr.image[rows], mirflickr.text[rows], mirflickr.n_labels, 256)


def test_a_trained_model_passes_the_model_check(tiny_learner, probe):
    assert model_problems(tiny_learner.model, probe, CHECK) == []


def test_non_finite_weights_fail_the_model_check(tiny_learner, probe):
    model = copy.deepcopy(tiny_learner.model)
    with torch.no_grad():
        model.text.body[0].weight[0, 0] = float("nan")
    (problem,) = model_problems(model, probe, CHECK)
    assert "non-finite weights" in problem and "text.body.0.weight" in problem


def test_a_model_that_codes_every_item_alike_fails_the_model_check(tiny_learner, probe):
    model = copy.deepcopy(tiny_learner.model)
    with torch.no_grad():
        last = model.image.body[-1]
        last.weight.zero_()
        last.bias.fill_(0.3)
    problems = model_problems(model, probe, CHECK)
    assert any("img: collapsed" in p for p in problems)
    assert any("img" in p and "constant" in p for p in problems)
    assert not any(p.startswith("txt") for p in problems)


def test_a_probe_travels_in_the_state_with_the_label_count(tiny_learner, probe, mirflickr):
    state = probe.attach(tiny_learner.export_state())
    back = Probe.of(state)
    assert back.n_labels == mirflickr.n_labels
    np.testing.assert_array_equal(back.image, probe.image)
    assert Probe.of(tiny_learner.export_state()) is None, "states from before probes carry none"


def test_every_kind_of_the_fault_drill_is_refused_by_the_arrival_check_with_its_reason(mirflickr, arrivals):
    from producers.drill import KINDS, bad_arrivals

    drill = bad_arrivals(mirflickr, message_max_bytes=1_000_000)
    for _ in range(2 * len(KINDS)):
        bad = next(drill)
        if bad.kind == "oversize":
            assert len(bad.value) > 1_000_000, "the runtime refuses it by size before decoding"
            continue
        with pytest.raises(schemas.SchemaError) as err:
            arrivals.check(schemas.decode_arrival(bad.value, bad.headers))
        assert err.value.reason == bad.reason, bad.kind
