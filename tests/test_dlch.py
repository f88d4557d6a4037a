"""DLCH: frozen original codes, the lifelong loss terms, DCC, index maps, streaming and state."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fpocmh_core import codes, config, dcc, evaluation
from fpocmh_core.learners.dlch import DlchLearner
from fpocmh_core.learners.dlch_train import CodeStats, normalised_labels, train_lifelong
from fpocmh_core.learners.registry import learner_class
from fpocmh_core.protocols import P2Config, p2_split, paired_records
from fpocmh_core.records import ItemRecord, Modality
from fpocmh_core.state import ModelState

BITS = 16
# Small networks, few epochs, small Omega: the mechanics, not the accuracy, are under test here.
SMALL = {
    "hidden": [128],
    "label_hidden": [64],
    "original.epochs": 4,
    "original.bank_sample": 256,
    "original.batch": 64,
    "lifelong.omega": 300,
    "lifelong.reservoir": 250,
    "lifelong.batch": 64,
    "lifelong.epochs": 3,
    "lifelong.lr": 0.001,
}


@pytest.fixture(scope="module")
def p2_small(mirflickr):
    torch.set_num_threads(1)
    split = p2_split(mirflickr, config.load(P2Config, "p2", overrides={"increments": 2}))
    return {
        "seen": split.seen[:700],
        "increments": [inc[:160] for inc in split.increments],
        "query": split.query[:400],
        "new_columns": list(split.new_label_columns),
    }


@pytest.fixture(scope="module")
def boot(mirflickr, p2_small) -> DlchLearner:
    return DlchLearner.bootstrap(mirflickr, p2_small["seen"], BITS, SMALL, progress=False)


def fresh(boot: DlchLearner, **lifelong: float) -> DlchLearner:
    learner = copy.deepcopy(boot)
    learner.cfg = config.build(
        type(boot.cfg),
        {**config.to_dict(boot.cfg), "lifelong": {**config.to_dict(boot.cfg.lifelong), **lifelong}},
    )
    return learner


def run_increment(learner: DlchLearner, ds, rows: np.ndarray, chunk: int):
    learner.learn(paired_records(ds, rows, chunk))
    return learner.finish_increment()


def test_registered_under_dlch():
    assert learner_class("dlch") is DlchLearner


def test_original_codes_are_bit_for_bit_unchanged_after_two_increments(mirflickr, p2_small, boot):
    learner = copy.deepcopy(boot)
    ids0, img0, txt0 = learner.frozen_codes()
    assert np.array_equal(ids0, p2_small["seen"])
    first = run_increment(learner, mirflickr, p2_small["increments"][0], 0)
    ids1, img1, txt1 = learner.frozen_codes()
    second = run_increment(learner, mirflickr, p2_small["increments"][1], 1)
    ids2, img2, txt2 = learner.frozen_codes()

    n0, n1 = ids0.size, ids1.size
    assert np.array_equal(img2[:n0], img0) and np.array_equal(txt2[:n0], txt0)
    assert np.array_equal(img2[:n1], img1) and np.array_equal(txt2[:n1], txt1)
    assert np.array_equal(ids2, np.concatenate([p2_small["seen"], *p2_small["increments"]]))
    written_first = {c.item_id for c in first.codes}
    written_second = {c.item_id for c in second.codes}
    assert written_first == set(p2_small["increments"][0].tolist())
    assert written_second == set(p2_small["increments"][1].tolist())


# ---- the loss terms ---------------------------------------------------------------------------------


def lifelong_run(boot: DlchLearner, ds, rows: np.ndarray, **lifelong: float):
    """One lifelong update; returns the learner, its Omega problem and the updated outputs on Omega."""
    learner = fresh(boot, **lifelong)
    labels = ds.labels[rows]
    problem = learner.lifelong_problem(rows, ds.image[rows], ds.text[rows], labels, np.random.default_rng(3))
    torch.manual_seed(0)
    result = train_lifelong(learner.model, problem, learner.cfg.lifelong, seed=0)
    u = learner.model.relaxed(problem.omega_image, Modality.IMAGE)
    return learner, problem, result, u


def old_query_map(learner: DlchLearner, ds, p2_small) -> float:
    """I->T and T->I mAP of the queries without a new label against the frozen (old) codes."""
    q = p2_small["query"]
    q = q[~ds.labels[q][:, p2_small["new_columns"]].any(axis=1)]
    ids, img, txt = learner.frozen_codes()
    q_img = learner.encode(ds.image[q], Modality.IMAGE)
    q_txt = learner.encode(ds.text[q], Modality.TEXT)
    return evaluation.mean_average_precision(
        q_img, txt, ds.labels[q], ds.labels[ids]
    ) + evaluation.mean_average_precision(q_txt, img, ds.labels[q], ds.labels[ids])


def test_without_the_old_code_term_old_queries_lose_map(mirflickr, p2_small, boot):
    rows = p2_small["increments"][0]
    # Quantisation also pulls the outputs of old Omega rows towards their frozen codes; it is off in both
    # runs so that the old-code term's own effect shows.
    kw = {"epochs": 6, "lr": 0.003, "alpha": 0.0, "beta": 0.1}
    with_old, *_ = lifelong_run(boot, mirflickr, rows, **kw)
    without_old, *_ = lifelong_run(boot, mirflickr, rows, old_weight=0.0, **kw)
    assert old_query_map(without_old, mirflickr, p2_small) < old_query_map(with_old, mirflickr, p2_small) - 0.02


def test_without_balance_the_bits_are_less_balanced(mirflickr, p2_small, boot):
    rows = p2_small["increments"][0]
    *_, u_bal = lifelong_run(boot, mirflickr, rows, beta=5.0)
    *_, u_free = lifelong_run(boot, mirflickr, rows, beta=0.0)

    def imbalance(u: np.ndarray) -> float:
        return float(np.abs(codes.sign_codes(u).mean(axis=0)).mean())

    assert imbalance(u_bal) < imbalance(u_free)


def test_without_quantisation_outputs_drift_from_their_codes(mirflickr, p2_small, boot):
    rows = p2_small["increments"][0]
    _, problem, result, u_q = lifelong_run(boot, mirflickr, rows, alpha=5.0)
    _, problem0, result0, u_free = lifelong_run(boot, mirflickr, rows, alpha=0.0)

    def gap(problem, result, u) -> float:
        targets = problem.omega_targets(problem.old_image_codes, result.image_codes)
        return float(np.abs(u - targets).mean())

    assert gap(problem, result, u_q) < gap(problem0, result0, u_free)


def test_factorised_pair_loss_equals_the_explicit_sum():
    rng = np.random.default_rng(0)
    b = np.where(rng.random((300, 16)) < 0.5, -1.0, 1.0)
    labels = (rng.random((300, 5)) < 0.4).astype(np.float32)
    labels[:, 0] = 1
    u = torch.tanh(torch.randn(9, 16))
    u_labels = (rng.random((9, 5)) < 0.4).astype(np.float32)
    u_labels[:, 1] = 1
    s = normalised_labels(u_labels) @ normalised_labels(labels).T
    explicit = ((u @ torch.tensor(b, dtype=torch.float32).T / 16 - s) ** 2).sum(dim=1)
    factorised = CodeStats.of(b, normalised_labels(labels)).pair_sums(u, normalised_labels(u_labels))
    assert torch.allclose(explicit, factorised, rtol=1e-4, atol=1e-3)


# ---- DCC --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_dcc_never_increases_its_objective_and_beats_random_codes(seed):
    rng = np.random.default_rng(seed)
    m, n, c = 60, 40, 16
    u = np.tanh(rng.standard_normal((m, c)))
    s = rng.random((m, n))
    u_bar = np.zeros((n, c))
    u_bar[:10] = np.tanh(rng.standard_normal((10, c)))
    b = np.where(rng.random((n, c)) < 0.5, -1.0, 1.0)
    start = dcc.objective(b, s, u, u_bar, alpha=5.0)
    values = [start]
    for _ in range(4):
        b = dcc.solve(b, s, u, u_bar, alpha=5.0, sweeps=1)
        assert set(np.unique(b)) <= {-1.0, 1.0}
        values.append(dcc.objective(b, s, u, u_bar, alpha=5.0))
    assert all(later <= earlier + 1e-9 for earlier, later in zip(values, values[1:]))
    random_codes = [np.where(rng.random((n, c)) < 0.5, -1.0, 1.0) for _ in range(20)]
    assert values[-1] < min(dcc.objective(r, s, u, u_bar, alpha=5.0) for r in random_codes)


# ---- index maps -------------------------------------------------------------------------------------


def test_omega_rows_map_to_their_own_database_rows(mirflickr, p2_small, boot):
    """Every Omega row's quantisation target is the code of that very item, and U_bar lands on it.

    The reference code indexes the stacked codes by the position inside Omega (target of row i = code
    of database row i) and passes empty maps for U_bar; both checks below fail for that.
    """
    ds = mirflickr
    learner = copy.deepcopy(boot)
    run_increment(learner, ds, p2_small["increments"][0], 0)
    rows = p2_small["increments"][1]
    problem = learner.lifelong_problem(rows, ds.image[rows], ds.text[rows], ds.labels[rows], np.random.default_rng(1))
    is_old = problem.omega_old >= 0
    assert is_old.any() and (~is_old).any()
    assert np.array_equal(problem.omega_image, ds.image[problem.omega_ids])
    assert np.array_equal(problem.omega_labels, ds.labels[problem.omega_ids])

    frozen_ids, frozen_img, _ = learner.frozen_codes()
    new_codes = np.where(np.random.default_rng(2).random((rows.size, BITS)) < 0.5, -1, 1)
    targets = problem.omega_targets(problem.old_image_codes, new_codes)
    stored = dict(zip(frozen_ids.tolist(), codes.unpack(frozen_img, BITS), strict=True))
    learned = dict(zip(rows.tolist(), new_codes, strict=True))
    for i, item in enumerate(problem.omega_ids.tolist()):
        expected = stored[item] if is_old[i] else learned[item]
        assert np.array_equal(targets[i], expected), f"Omega row {i} (item {item}) got another item's code"

    u = np.arange(problem.omega_ids.size, dtype=np.float64)[:, None] * np.ones((1, BITS))
    u_bar = problem.u_bar(u)
    for i in np.flatnonzero(~is_old):
        j = int(np.flatnonzero(rows == problem.omega_ids[i])[0])
        assert np.array_equal(u_bar[j], u[i])
    not_in_omega = np.setdiff1d(np.arange(rows.size), problem.omega_new[~is_old])
    assert not u_bar[not_in_omega].any()


# ---- streaming --------------------------------------------------------------------------------------


def test_micro_batches_across_a_boundary_trigger_one_update_per_increment(mirflickr, p2_small, boot):
    learner = copy.deepcopy(boot)
    inc0, inc1 = p2_small["increments"]
    stream = paired_records(mirflickr, inc0, 0) + paired_records(mirflickr, inc1, 1)
    original = paired_records(mirflickr, p2_small["seen"][:5], -1)
    stream = original + stream
    written: list = []
    updates_before = learner.updates
    for i in range(0, len(stream), 64):  # a batch straddles the boundary between the two increments
        written.extend(learner.learn(stream[i : i + 64]).codes)
    assert learner.updates == updates_before + 1
    assert {c.item_id for c in written} == set(inc0.tolist())
    assert sorted((c.item_id, c.modality) for c in written) == sorted(
        (i, m) for i in inc0.tolist() for m in (Modality.IMAGE, Modality.TEXT)
    )
    last = learner.finish_increment()
    assert learner.updates == updates_before + 2
    assert {c.item_id for c in last.codes} == set(inc1.tolist()) and len(last.codes) == 2 * inc1.size
    assert learner.finish_increment().codes == []
    assert all(c.code.dtype == np.uint8 and c.code.shape == (BITS // 8,) for c in written)


def test_export_and_from_state_round_trip_including_a_pending_increment(mirflickr, p2_small, boot):
    learner = copy.deepcopy(boot)
    run_increment(learner, mirflickr, p2_small["increments"][0], 0)
    learner.bump_version()
    learner.learn(paired_records(mirflickr, p2_small["increments"][1][:50], 1))
    state = learner.export_state()
    restored = DlchLearner.from_state(ModelState.from_bytes(state.to_bytes()))

    assert (restored.version, restored.parent_version) == (learner.version, learner.parent_version)
    again = restored.export_state()
    assert set(again.tensors) == set(state.tensors)
    for key, value in state.tensors.items():
        assert np.array_equal(again.tensors[key], value), key
    assert again.meta == state.meta
    x = mirflickr.image[p2_small["query"][:20]]
    assert np.array_equal(restored.encode(x, Modality.IMAGE), learner.encode(x, Modality.IMAGE))

    # Same future behaviour: finishing the pending increment writes the same codes.
    a, b = learner.finish_increment(), restored.finish_increment()
    assert [(c.item_id, c.modality, c.code.tobytes()) for c in a.codes] == [
        (c.item_id, c.modality, c.code.tobytes()) for c in b.codes
    ]


def test_halves_of_a_pair_are_joined_and_learned_the_rest_is_coded_and_every_arrival_counted(mirflickr, p2_small, boot):
    learner = copy.deepcopy(boot)
    ds = mirflickr
    a, b, c, d = (int(r) for r in p2_small["increments"][0][:4])
    stream = [
        ItemRecord(a, ds.image[a], None, None, chunk=0),  # the image half of a, unlabelled ...
        ItemRecord(b, ds.image[b], ds.text[b], None, chunk=0),  # a pair without labels
        ItemRecord(d, ds.image[d], None, ds.labels[d], chunk=0),  # a half whose other half never comes
        ItemRecord(a, None, ds.text[a], ds.labels[a], chunk=0),  # ... and its text half, labelled, later
        ItemRecord(c, ds.image[c], ds.text[c], ds.labels[c], chunk=0),
    ]
    frozen_before = learner.frozen_codes()[0].size
    first = learner.learn(stream)
    assert first.outcomes == {} and first.pending == len(stream), "buffered until the increment ends"
    report = learner.finish_increment()

    assert report.outcomes == {"learned": 3, "coded": 2}
    written = {(r.item_id, r.modality): r.code for r in report.codes}
    assert set(written) == {(i, m) for i in (a, b, c) for m in Modality} | {(d, Modality.IMAGE)}
    for item, m in ((b, Modality.IMAGE), (b, Modality.TEXT), (d, Modality.IMAGE)):
        features = ds.image if m is Modality.IMAGE else ds.text
        assert np.array_equal(written[(item, m)], learner.encode(features[item][None], m)[0])
    ids = learner.frozen_codes()[0]
    assert ids.size == frozen_before + 2 and set(ids[-2:].tolist()) == {a, c}

    again = learner.learn([ItemRecord(c, ds.image[c], ds.text[c], ds.labels[c], chunk=1)])
    offline = learner.learn(paired_records(ds, p2_small["seen"][:3], -1))
    assert offline.outcomes == {"offline": 3} and offline.pending == 1
    assert again.outcomes == {} and learner.flush().outcomes == {"known": 1}
