"""FPO-CMH: anchor bank, streaming loss, asynchronous windows, rehearsal, promotion, state.

Small synthetic arrays for the mechanics, a short stream from the real benchmark for the behaviour.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fpocmh_core import codes, config, evaluation
from fpocmh_core.bank import MODALITIES, AnchorBank
from fpocmh_core.data import CrossModalDataset
from fpocmh_core.learners.base import LearnReport
from fpocmh_core.learners.fpocmh import FpocmhLearner, load_config
from fpocmh_core.learners.self_check import RehearsalWeights, SelfCheckConfig, stored_minus_rehashed
from fpocmh_core.nets import HashModel
from fpocmh_core.offline import TrainingSet, load_offline_config, train_offline
from fpocmh_core.protocols import p1_chunk_records
from fpocmh_core.records import ItemRecord, Modality
from fpocmh_core.state import ModelState

IMG, TXT = Modality.IMAGE, Modality.TEXT
# The machine is shared; one thread avoids oversubscription, which slows small matmuls several-fold.
torch.set_num_threads(1)


def synthetic(n: int = 240, n_labels: int = 4, space: str = "separate", seed: int = 0) -> CrossModalDataset:
    """Items of ``n_labels`` categories (some with a second one), one cluster per category per modality."""
    rs = np.random.RandomState(seed)
    labels = np.zeros((n, n_labels), np.uint8)
    labels[np.arange(n), rs.randint(0, n_labels, n)] = 1
    second = rs.rand(n) < 0.3
    labels[np.flatnonzero(second), rs.randint(0, n_labels, second.sum())] = 1
    dims = (12, 12) if space == "joint" else (12, 9)
    centres = [rs.randn(n_labels, d) * 3 for d in dims]
    if space == "joint":
        centres[1] = centres[0]
    feats = [(labels @ c) / labels.sum(1, keepdims=True) + rs.randn(n, c.shape[1]) for c in centres]
    return CrossModalDataset(
        "synthetic", feats[0].astype(np.float32), feats[1].astype(np.float32), labels, feature_space=space
    )


def make_learner(ds: CrossModalDataset, rows: np.ndarray, dropout: float = 0.0, **overrides) -> FpocmhLearner:
    model = HashModel.create(ds.dims, 16, hidden=(32,), dropout=dropout, seed=0)
    return FpocmhLearner.from_offline(model, ds, rows, load_config(overrides={"mu": 4, **overrides}))


def unimodal_stream(ds: CrossModalDataset, rows, labelled: bool = True, chunk: int = 0) -> list[ItemRecord]:
    """Every row split into an image-only and a text-only arrival, interleaved."""
    out = []
    for r in rows:
        lab = ds.labels[r] if labelled else None
        out.append(ItemRecord(int(r), ds.image[r], None, lab, chunk))
        out.append(ItemRecord(int(r), None, ds.text[r], lab, chunk))
    return out


def features(ds: CrossModalDataset, modality: Modality) -> np.ndarray:
    return ds.image if modality is IMG else ds.text


def params(learner: FpocmhLearner, modality: Modality) -> list[torch.Tensor]:
    return [p.detach().clone() for p in learner.model.net(modality).parameters()]


def same(a: list[torch.Tensor], b: list[torch.Tensor], atol: float = 0.0) -> bool:
    return all(torch.allclose(x, y, atol=atol, rtol=0) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def ds() -> CrossModalDataset:
    return synthetic()


OFFLINE = np.arange(120)
STREAM = np.arange(120, 240)
# Learning rates at which the networks move a lot on these streams, so that what holds codes shows
# (constant: the schedule's boost would multiply them).
CONSTANT_LR = {"lr_schedule.start": 1.0, "lr_schedule.decay_steps": 0}
FAST = {"optimizer.lr_image": 0.2, "optimizer.lr_text": 0.2, **CONSTANT_LR}
REAL_FAST = {"optimizer.lr_image": 0.05, "optimizer.lr_text": 0.05, **CONSTANT_LR}
OFFLINE_SAMPLE = {"code_rehearsal.stream": False}  # rehearse the fixed offline sample, not the reservoir
NO_CODE_REHEARSAL = {"code_rehearsal.items": 0, **OFFLINE_SAMPLE}
NO_PAIRWISE = {"pairwise.weight": 0.0}
STREAM_REHEARSAL = {"code_rehearsal.stream": True}


# --- the anchor bank ---------------------------------------------------------------------------


def test_bank_rows_are_categories_seen_in_both_modalities_with_per_category_means(ds):
    feats = {IMG: ds.image[OFFLINE], TXT: ds.text[OFFLINE]}
    relaxed = {IMG: np.tanh(ds.image[OFFLINE][:, :8]), TXT: np.tanh(ds.text[OFFLINE][:, :8])}
    members = {IMG: ds.labels[OFFLINE].copy(), TXT: ds.labels[OFFLINE].copy()}
    members[TXT][:, 2] = 0  # category 2 never seen on the text side
    bank = AnchorBank.build(feats, relaxed, members, promote_after=1)
    assert bank.categories == [0, 1, 3]
    has0 = ds.labels[OFFLINE][:, 0] == 1
    np.testing.assert_allclose(bank.feat[IMG][0], ds.image[OFFLINE][has0].mean(0), rtol=1e-5)
    np.testing.assert_allclose(bank.code[TXT][0], relaxed[TXT][has0].mean(0), rtol=1e-5)
    assert bank.count[IMG][0] == has0.sum()
    np.testing.assert_array_equal(bank.initial_feat[IMG], bank.feat[IMG])


def test_bank_update_is_a_running_mean_and_row_0_is_updated(ds):
    learner = make_learner(ds, OFFLINE)
    bank = learner.bank
    assert bank.categories[0] == 0
    n0, f0 = bank.count[IMG][0], bank.feat[IMG][0].copy()
    x, h = np.ones(ds.dims[0], np.float32), np.ones(16, np.float32)
    bank.observe(IMG, x, h, [0])
    assert bank.count[IMG][0] == n0 + 1
    np.testing.assert_allclose(bank.feat[IMG][0], (n0 * f0 + x) / (n0 + 1), rtol=1e-5)
    np.testing.assert_array_equal(bank.initial_feat[IMG][0], f0)  # the rehearsal copy never moves


def test_a_streamed_item_updates_bank_row_0(ds):
    learner = make_learner(ds, OFFLINE)
    row0 = learner.bank.code[TXT][0].copy()
    r = int(np.flatnonzero(ds.labels[STREAM, 0])[0]) + STREAM[0]
    learner.learn([ItemRecord(r, None, ds.text[r], ds.labels[r])])
    assert not np.allclose(learner.bank.code[TXT][0], row0)


def test_novel_category_is_promoted_only_after_both_modalities_were_seen(ds):
    has3 = ds.labels[:, 3] == 1
    offline = OFFLINE[~has3[OFFLINE]]
    learner = make_learner(ds, offline, is_accessible_bank_count=2)
    assert 3 not in learner.bank.categories
    rows = [int(r) for r in STREAM if has3[r]][:3]
    images = [ItemRecord(r, ds.image[r], None, ds.labels[r]) for r in rows]
    texts = [ItemRecord(r, None, ds.text[r], ds.labels[r]) for r in rows]
    learner.learn(images)  # three images: still no text of category 3
    assert 3 not in learner.bank.categories and 3 in learner.bank.pending
    learner.learn(texts[:1])  # one text: below is_accessible_bank_count
    assert 3 not in learner.bank.categories
    learner.learn(texts[1:2])
    assert learner.bank.categories[-1] == 3 and 3 not in learner.bank.pending
    assert learner.bank_rows == len(learner.bank) == 4
    np.testing.assert_allclose(learner.bank.feat[IMG][-1], ds.image[rows].mean(0), rtol=1e-5)
    np.testing.assert_allclose(learner.bank.feat[TXT][-1], ds.text[rows[:2]].mean(0), rtol=1e-5)


# --- the streaming loss and its optimisation ---------------------------------------------------


def test_images_and_texts_step_asynchronously_each_after_its_own_window(ds):
    mu = 4
    learner = make_learner(ds, OFFLINE, mu=mu)
    imgs = [r for r in unimodal_stream(ds, STREAM) if r.image is not None][: 3 * mu]
    txts = [r for r in unimodal_stream(ds, STREAM) if r.text is not None][:mu]
    text_before = params(learner, TXT)
    report = learner.learn(imgs)
    assert report.steps == {"img": 3, "txt": 0}
    assert same(params(learner, TXT), text_before)  # images send no gradient into the text network
    report = learner.learn(txts[:-1])
    assert report.steps == {"img": 0, "txt": 0} and same(params(learner, TXT), text_before)
    image_before = params(learner, IMG)
    report = learner.learn(txts[-1:])
    assert report.steps == {"img": 0, "txt": 1}
    assert not same(params(learner, TXT), text_before) and same(params(learner, IMG), image_before)


def test_a_paired_item_counts_towards_both_windows(ds):
    learner = make_learner(ds, OFFLINE, mu=2)
    pairs = [ItemRecord(int(r), ds.image[r], ds.text[r], ds.labels[r]) for r in STREAM[:2]]
    assert learner.learn(pairs).steps == {"img": 1, "txt": 1}


@pytest.mark.parametrize("overrides", [{}, OFFLINE_SAMPLE], ids=["default", "offline-sample-rehearsal"])
def test_micro_batch_equals_item_by_item(ds, overrides):
    stream = unimodal_stream(ds, STREAM[:30])
    stream[7] = ItemRecord(stream[7].item_id, stream[7].image, ds.text[stream[7].item_id], None)  # a pair
    for i in range(0, len(stream), 3):  # some arrivals without labels: their categories come from the bank
        stream[i] = ItemRecord(stream[i].item_id, stream[i].image, stream[i].text, None)
    # A reservoir smaller than the stream, so that arrivals replace slots while the learners run.
    overrides = {"reservoir.items": 100, **overrides}
    batched, single = make_learner(ds, OFFLINE, **overrides), make_learner(ds, OFFLINE, **overrides)
    batched.learn(stream[:50])
    batched.learn(stream[50:])
    for rec in stream:
        single.learn([rec])
    for m in MODALITIES:
        assert same(params(batched, m), params(single, m), atol=1e-5)
        np.testing.assert_allclose(batched.bank.code[m], single.bank.code[m], atol=1e-5)
        np.testing.assert_allclose(batched.bank.feat[m], single.bank.feat[m], atol=1e-5)
        np.testing.assert_array_equal(batched.reservoir.codes[m], single.reservoir.codes[m])
    assert batched.steps == single.steps and batched.steps[IMG] > 3
    assert batched.reservoir.seen[IMG] > 100


def test_the_learning_rate_starts_at_start_times_lr_and_decays_with_each_modalitys_own_steps(ds):
    schedule = {"lr_schedule.start": 4.0, "lr_schedule.decay_steps": 2.0}
    learner = make_learner(ds, OFFLINE, mu=2, **schedule)
    base = learner.cfg.optimizer.lr_image
    images = [r for r in unimodal_stream(ds, STREAM) if r.image is not None][:6]
    assert learner.learn(images).steps == {"img": 3, "txt": 0}
    # Steps 0, 1 and 2 ran at 4, 4 / 1.5 and 4 / 2 times the rate; the text network has not stepped yet.
    assert learner.optimizers[IMG].param_groups[0]["lr"] == pytest.approx(base * 4.0 / 2.0)
    assert learner.optimizers[TXT].param_groups[0]["lr"] == pytest.approx(learner.cfg.optimizer.lr_text)
    constant = {"lr_schedule.start": 3.0, "lr_schedule.decay_steps": 0}
    assert load_config(overrides=constant).lr_schedule.factor(100) == 3.0


@pytest.mark.parametrize("restart", [True, False])
def test_a_category_the_stream_brings_starts_the_schedule_over_when_asked(ds, restart):
    has3 = ds.labels[:, 3] == 1
    learner = make_learner(ds, OFFLINE[~has3[OFFLINE]], mu=2, **{"lr_schedule.restart_on_new_category": restart})
    old = [r for r in unimodal_stream(ds, [int(r) for r in STREAM if not has3[r]])][:12]
    learner.learn(old)
    assert learner.steps == {IMG: 3, TXT: 3}
    row = next(int(r) for r in STREAM if has3[r])
    learner.learn(unimodal_stream(ds, [row]))  # its image, then its text: category 3 is promoted
    assert 3 in learner.bank.categories
    assert learner.steps == ({IMG: 0, TXT: 0} if restart else {IMG: 3, TXT: 3})


def test_once_the_stream_brings_a_category_the_schedule_restarts_higher_and_rehearsal_relaxes(ds):
    has3 = ds.labels[:, 3] == 1
    settings = {"lr_schedule.start": 2.0, "lr_schedule.restart_start": 8.0, "lr_schedule.decay_steps": 1.0}
    rehearsal = {"code_rehearsal.weight": 5.0, "code_rehearsal.new_category_weight": 0.5}
    learner = make_learner(ds, OFFLINE[~has3[OFFLINE]], mu=2, **settings, **rehearsal)
    base, cfg = learner.cfg.optimizer.lr_image, learner.cfg
    old_images = [r for r in unimodal_stream(ds, [int(r) for r in STREAM if not has3[r]]) if r.image is not None]
    learner.learn(old_images[:2])
    assert not learner.bank.has_new_category
    assert learner.optimizers[IMG].param_groups[0]["lr"] == pytest.approx(base * 2.0)
    assert cfg.code_rehearsal.weight_for(learner.bank.has_new_category) == 5.0
    learner.learn(unimodal_stream(ds, [next(int(r) for r in STREAM if has3[r])]))
    assert learner.bank.has_new_category
    learner.learn(old_images[50:52])
    assert learner.optimizers[IMG].param_groups[0]["lr"] == pytest.approx(base * 8.0)
    assert cfg.code_rehearsal.weight_for(learner.bank.has_new_category) == 0.5


def test_the_lighter_rehearsal_changes_learning_only_after_a_new_category(ds):
    has3 = ds.labels[:, 3] == 1
    old_images = [r for r in unimodal_stream(ds, [int(r) for r in STREAM if not has3[r]]) if r.image is not None]
    new_row = unimodal_stream(ds, [next(int(r) for r in STREAM if has3[r])])
    learners = [
        make_learner(ds, OFFLINE[~has3[OFFLINE]], mu=2, **{"code_rehearsal.new_category_weight": w})
        for w in (None, 0.5)
    ]

    def same() -> bool:
        a, b = (dict(x.model.image.named_parameters()) for x in learners)
        return all(torch.equal(a[k], b[k]) for k in a)

    for learner in learners:
        learner.learn(old_images[:4])
    assert same(), "before any new category both learn alike"
    for learner in learners:
        learner.learn(new_row)
        learner.learn(old_images[50:52])
    assert not same(), "after it, the lighter rehearsal weight reaches the image network's step"


def check_config(**changes) -> SelfCheckConfig:
    """A self-check on every view over 8 slots, band 0.004, weight kept within [1, configured]; ``changes`` on top."""
    settings = {"every": 1, "items": 8, "queries": 8, "band": 0.004, "min_weight": 1.0, "max_weight": 0.0}
    return SelfCheckConfig(**{**settings, "min_lr_scale": 1.0, "since": "start", "two_sided": False, **changes})


def test_the_rehearsal_weight_halves_while_stored_codes_keep_pace_and_doubles_once_model_and_codes_part():
    cfg = check_config(min_weight=0.5, two_sided=True)
    weights = RehearsalWeights(cfg, weight=5.0)
    weights.update({IMG: +0.001, TXT: -0.006})
    assert weights.weights == {IMG: 2.5, TXT: 5.0}, "the weight never exceeds the configured one"
    weights.update({IMG: -0.001, TXT: -0.003})
    assert weights.weights == {IMG: 1.25, TXT: 5.0}, "between -band and -band / 2 a weight stays"
    for _ in range(4):
        weights.update({IMG: 0.0, TXT: 0.0})
    assert weights.weights == {IMG: 0.5, TXT: 0.5}
    weights.update({IMG: -0.01, TXT: -0.002})
    assert weights.weights == {IMG: 1.0, TXT: 0.5}
    weights.update({IMG: 0.0, TXT: +0.01})
    assert weights.weights == {IMG: 0.5, TXT: 1.0}, "stored codes retrieving better than a re-hash is parting too"


def test_a_network_at_its_maximum_weight_that_still_runs_ahead_learns_slower_and_gets_its_rate_back_first():
    cfg = check_config(max_weight=20.0, min_lr_scale=0.25)
    weights = RehearsalWeights(cfg, weight=5.0)
    for _ in range(2):
        weights.update({IMG: -0.01, TXT: 0.0})
    assert weights.weights == {IMG: 20.0, TXT: 1.25} and weights.lr_scales == {IMG: 1.0, TXT: 1.0}
    for _ in range(3):
        weights.update({IMG: -0.01, TXT: 0.0})
    assert weights.lr_scales[IMG] == 0.25, "halved twice, then held at min_lr_scale"
    weights.update({IMG: 0.0, TXT: 0.0})
    assert (weights.weights[IMG], weights.lr_scales[IMG]) == (20.0, 0.5), "the rate comes back before the weight"
    for _ in range(2):
        weights.update({IMG: 0.0, TXT: 0.0})
    assert (weights.weights[IMG], weights.lr_scales[IMG]) == (10.0, 1.0)
    clone = RehearsalWeights(cfg, weight=5.0)
    clone.load_meta(weights.to_meta())
    assert clone.weights == weights.weights and clone.lr_scales == weights.lr_scales


def test_learner_codes_are_held_back_while_stored_codes_run_ahead_of_a_re_hash_and_written_again_within_half_the_band():
    cfg = check_config(since="new_category", hold_codes="always")
    weights = RehearsalWeights(cfg, weight=5.0)
    weights.hold({IMG: -0.01, TXT: +0.006})
    assert weights.holding == {IMG: False, TXT: True}, "only stored codes ahead of the re-hash are held"
    weights.hold({IMG: 0.0, TXT: +0.003})
    assert weights.holding[TXT], "between band / 2 and band nothing changes"
    clone = RehearsalWeights(cfg, weight=5.0)
    clone.load_meta(weights.to_meta())
    assert clone.holding == weights.holding
    weights.hold({IMG: 0.0, TXT: +0.001})
    assert weights.holding[TXT] is False


@pytest.mark.parametrize(("given", "read"), [(True, "always"), (False, "never"), ("before_new_category", None)])
def test_hold_codes_reads_the_boolean_of_configs_from_before_it_had_three_values(given, read):
    cfg = load_config(overrides={"code_rehearsal.self_check.hold_codes": given})
    assert cfg.code_rehearsal.self_check.hold_codes == (read or given)


def test_hold_codes_rejects_a_value_it_does_not_know():
    with pytest.raises(config.ConfigError, match="hold_codes must be one of"):
        load_config(overrides={"code_rehearsal.self_check.hold_codes": "sometimes"})


def test_a_held_modality_gets_no_learner_codes_while_the_other_keeps_its_own(ds):
    learner = make_learner(ds, OFFLINE, learner_codes_block=4, **{"code_rehearsal.self_check.hold_codes": "always"})
    learner.weights.holding[TXT] = True
    report = learner.learn(unimodal_stream(ds, STREAM[:8]))
    coded = {m: {c.item_id for c in report.codes if c.modality is m} for m in MODALITIES}
    assert coded[IMG] == {int(r) for r in STREAM[:8]} and coded[TXT] == set()


def test_holding_before_a_new_category_writes_held_learner_codes_again_once_the_stream_brings_one(ds):
    has3 = ds.labels[:, 3] == 1
    hold = {"code_rehearsal.self_check.hold_codes": "before_new_category"}
    learner = make_learner(ds, OFFLINE[~has3[OFFLINE]], mu=2, learner_codes_block=2, **hold)
    learner.weights.holding[TXT] = True
    old = [int(r) for r in STREAM if not has3[r]]

    def texts(report: LearnReport) -> set[int]:
        return {c.item_id for c in report.codes if c.modality is TXT}

    assert texts(learner.learn(unimodal_stream(ds, old[:4]))) == set(), "held while the bank has no new category"
    new = next(int(r) for r in STREAM if has3[r])
    report = learner.learn(unimodal_stream(ds, [new, *old[4:6]]))
    assert learner.bank.has_new_category and learner.weights.holding[TXT]
    assert texts(report) == {new, *old[4:6]}, "once it has one, the held modality's codes are written again"


def test_the_self_check_sees_stored_codes_fall_behind_in_the_modality_whose_codes_fell_behind(ds):
    learner = make_learner(ds, OFFLINE)
    before = stored_minus_rehashed(learner.model, learner.reservoir, items=120, queries=120)
    size = learner.reservoir.size(TXT)
    flipped = np.random.default_rng(0).random((size, 16)) < 0.3
    learner.reservoir.codes[TXT][:size][flipped] *= -1  # as if the text codes had been stored by a worse model
    after = stored_minus_rehashed(learner.model, learner.reservoir, items=120, queries=120)
    assert after[TXT] < before[TXT] - 0.05, "image queries find related texts worse through the stored codes"
    assert after[IMG] == pytest.approx(before[IMG]), "the image codes did not change"


def test_since_start_the_self_check_guards_from_the_first_arrivals_of_a_stream_without_new_categories(ds):
    has3 = ds.labels[:, 3] == 1
    check = {
        "code_rehearsal.self_check.every": 8,
        "code_rehearsal.self_check.items": 64,
        "code_rehearsal.self_check.since": "start",
    }
    learner = make_learner(ds, OFFLINE[~has3[OFFLINE]], mu=2, learner_codes_block=4, **check)
    learner.learn(unimodal_stream(ds, [int(r) for r in STREAM if not has3[r]][:24]))
    assert not learner.bank.has_new_category
    measured = learner.rehearsal
    assert set(measured) == {IMG, TXT}, "measured on both networks with no new category"
    assert all(np.isfinite(gap) and 0 < scale <= 1 for gap, _, scale in measured.values())
    configured = learner.cfg.code_rehearsal.weight
    assert all(weight >= configured for _, weight, _ in measured.values()), "before one, it only holds tighter"


def test_by_default_the_self_check_measures_every_stream_but_steers_only_after_a_new_category_and_survives_a_restart(
    ds,
):
    has3 = ds.labels[:, 3] == 1
    # A band this wide counts any drift as keeping pace, so every check halves the weights.
    check = {"code_rehearsal.self_check.every": 8, "code_rehearsal.self_check.items": 64}
    learners = [
        make_learner(ds, OFFLINE[~has3[OFFLINE]], mu=2, learner_codes_block=4, **{**check, **switch})
        for switch in ({"code_rehearsal.self_check.band": 1.0}, {"code_rehearsal.self_check.every": 0})
    ]
    old = unimodal_stream(ds, [int(r) for r in STREAM if not has3[r]])
    for learner in learners:
        learner.learn(old[:24])
    before = learners[0].rehearsal
    assert set(before) == {IMG, TXT}, "the drift is measured before the stream brings a category"
    configured = learners[0].cfg.code_rehearsal.weight
    assert all(w == configured and s == 1.0 for _, w, s in before.values()), "but nothing is steered by it"
    assert same(params(learners[0], TXT), params(learners[1], TXT))
    for learner in learners:
        learner.learn(unimodal_stream(ds, [next(int(r) for r in STREAM if has3[r])]))
        learner.learn(old[24:40])
    measured = learners[0].rehearsal
    assert {m: w for m, (_, w, _) in measured.items()} == {IMG: 2.5, TXT: 2.5} and learners[1].rehearsal == {}
    clone = FpocmhLearner.from_state(ModelState.from_bytes(learners[0].export_state().to_bytes()))
    assert clone.rehearsal == measured and clone.unchecked == learners[0].unchecked
    for each in (*learners, clone):
        each.learn(old[40:60])
    assert same(params(learners[0], TXT), params(clone, TXT)) and clone.rehearsal == learners[0].rehearsal
    assert not same(params(learners[0], TXT), params(learners[1], TXT)), "the steered weight reaches the step"


def test_an_item_without_category_weighs_zero_and_sends_no_gradient(ds):
    learner = make_learner(ds, OFFLINE, theta=1.0, mu=100)  # no similarity reaches theta = 1
    r = int(STREAM[0])
    report = learner.learn([ItemRecord(r, ds.image[r], None, None)])
    assert report.losses["weight"] == 0.0
    assert all(p.grad is None or not p.grad.any() for p in learner.model.image.parameters())
    report = learner.learn([ItemRecord(r, ds.image[r], None, ds.labels[r])])  # labels give it categories
    assert report.losses["weight"] == 1.0
    assert any(p.grad is not None and p.grad.any() for p in learner.model.image.parameters())


def test_items_of_the_offline_part_are_ignored(ds):
    learner = make_learner(ds, OFFLINE, mu=1)
    before = learner.export_state()
    report = learner.learn(unimodal_stream(ds, OFFLINE[:5], chunk=-1))
    assert report.items == 0 and report.steps == {"img": 0, "txt": 0}
    after = learner.export_state()
    assert all(np.array_equal(before.tensors[k], after.tensors[k]) for k in before.tensors)


def twice_from_one_model(ds: CrossModalDataset, **overrides) -> tuple[HashModel, FpocmhLearner, FpocmhLearner]:
    """An offline model with dropout, and two learners built from copies of it with the same config."""
    model = HashModel.create(ds.dims, 16, hidden=(32,), dropout=0.5, seed=0)
    cfg = load_config(overrides=overrides)
    first, second = (FpocmhLearner.from_offline(copy.deepcopy(model), ds, OFFLINE, cfg) for _ in range(2))
    return model, first, second


def test_rehearsal_targets_are_the_offline_codes_of_the_anchors_in_eval_mode(ds):
    model, first, second = twice_from_one_model(ds, mu=4)
    for m in MODALITIES:
        np.testing.assert_array_equal(first.bank.rehearsal_targets[m], second.bank.rehearsal_targets[m])
        expected = codes.sign_codes(model.relaxed(first.bank.initial_feat[m], m))
        np.testing.assert_array_equal(first.bank.rehearsal_targets[m], expected)


def test_rehearsal_keeps_the_initial_anchors_codes(ds):
    """With a large learning rate the anchors' codes drift away from the offline ones unless rehearsed."""
    agreement = {}
    for gamma in (0.0, 10.0):
        learner = make_learner(ds, OFFLINE, gamma=gamma, logit_scale=10.0, **{**NO_CODE_REHEARSAL, **FAST})
        learner.learn(unimodal_stream(ds, STREAM))
        bank, model = learner.bank, learner.model
        now = {m: codes.sign_codes(model.relaxed(bank.initial_feat[m], m)) for m in MODALITIES}
        kept = [now[m] == bank.rehearsal_targets[m] for m in MODALITIES]
        agreement[gamma] = np.mean(kept)
    assert agreement[10.0] > agreement[0.0] + 0.05


def test_without_online_dropout_a_network_with_dropout_learns_as_one_without_it(ds):
    """``online_dropout: false`` steps the network that codes, not a dropout sample of it."""
    stream = unimodal_stream(ds, STREAM[:40])
    learnt = {}
    for dropout, online in ((0.0, True), (0.5, False), (0.5, True)):
        learner = make_learner(ds, OFFLINE, dropout=dropout, online_dropout=online)
        learner.learn(stream)
        learnt[dropout, online] = params(learner, Modality.TEXT)
    assert same(learnt[0.5, False], learnt[0.0, True], atol=1e-6)
    assert not same(learnt[0.5, True], learnt[0.0, True], atol=1e-6)


def test_gamma_weighs_the_rehearsal_loss(ds):
    losses = {}
    for gamma in (1.0, 3.0):
        learner = make_learner(ds, OFFLINE, gamma=gamma, mu=4)
        losses[gamma] = learner.learn(unimodal_stream(ds, STREAM[:2])).losses["rehearsal"]
    assert losses[3.0] == pytest.approx(3.0 * losses[1.0], rel=1e-5)


def test_stored_code_sample_is_a_seeded_offline_sample_with_the_codes_the_offline_model_stored(ds):
    model, first, second = twice_from_one_model(ds, **{"code_rehearsal.items": 50, **OFFLINE_SAMPLE})
    for m in MODALITIES:
        feats, stored = first.replay[m]
        assert feats.shape == (50, ds.dims[m is TXT]) and stored.shape == (50, 16)
        np.testing.assert_array_equal(feats, second.replay[m][0])
        # Eval mode (no dropout): exactly the codes an encoder wrote for these items.
        np.testing.assert_array_equal(stored, codes.sign_codes(model.relaxed(feats.astype(np.float32), m)))
    sample = first.replay[IMG][0].astype(np.float32)
    nearest = ds.image[OFFLINE][((sample[:, None] - ds.image[OFFLINE][None]) ** 2).sum(-1).argmin(1)]
    np.testing.assert_allclose(sample, nearest, rtol=1e-3, atol=1e-3)  # offline items, to float16 precision
    everything = FpocmhLearner.from_offline(copy.deepcopy(model), ds, OFFLINE, load_config(overrides=OFFLINE_SAMPLE))
    assert len(everything.replay[IMG][0]) == len(OFFLINE), "never more items than the offline part has"
    assert FpocmhLearner.from_offline(model, ds, OFFLINE, load_config(overrides=NO_CODE_REHEARSAL)).replay == {}


def test_code_rehearsal_loss_is_reported_only_when_it_is_on(ds):
    on = make_learner(ds, OFFLINE).learn(unimodal_stream(ds, STREAM[:8])).losses
    off = make_learner(ds, OFFLINE, **NO_CODE_REHEARSAL).learn(unimodal_stream(ds, STREAM[:8])).losses
    assert on["replay"] > 0 and "replay" not in off


def test_code_rehearsal_keeps_the_stored_codes_of_offline_items(ds):
    """At a learning rate where the networks move, fitting a sample of offline items to their stored
    codes keeps more of the offline part's codes (what the database holds) unchanged."""
    kept = {}
    for items in (0, 1024):
        learner = make_learner(ds, OFFLINE, **{"code_rehearsal.items": items, **OFFLINE_SAMPLE, **NO_PAIRWISE, **FAST})
        before = {m: learner.encode(features(ds, m)[OFFLINE], m) for m in MODALITIES}
        learner.learn(unimodal_stream(ds, STREAM))
        after = {m: learner.encode(features(ds, m)[OFFLINE], m) for m in MODALITIES}
        kept[items] = 1 - np.mean([codes.bit_drift(before[m], after[m]) for m in MODALITIES])
    assert kept[1024] > kept[0] + 0.03


# --- the reservoir and the pairwise term against stored codes -------------------------------------


def test_the_reservoir_starts_with_the_offline_items_their_stored_codes_and_labels(ds):
    model, learner, _ = twice_from_one_model(ds)
    for m in MODALITIES:
        n = learner.reservoir.size(m)
        assert n == len(OFFLINE)
        np.testing.assert_allclose(learner.reservoir.features[m][:n], features(ds, m)[OFFLINE], rtol=1e-2, atol=1e-2)
        stored = codes.sign_codes(model.relaxed(features(ds, m)[OFFLINE], m))
        np.testing.assert_array_equal(learner.reservoir.codes[m][:n], stored)
        np.testing.assert_array_equal(learner.reservoir.categories[m][:n], ds.labels[OFFLINE].astype(bool))


def test_arrivals_join_the_reservoir_with_the_code_the_model_gave_them_on_arrival(ds):
    learner = make_learner(ds, OFFLINE, mu=100)  # no step: the model of the arrival is the current one
    r = int(STREAM[0])
    learner.learn([ItemRecord(r, None, ds.text[r], ds.labels[r])])
    n = learner.reservoir.size(TXT)
    assert n == len(OFFLINE) + 1 and learner.reservoir.size(IMG) == len(OFFLINE)
    np.testing.assert_array_equal(
        learner.reservoir.codes[TXT][n - 1], codes.sign_codes(learner.model.relaxed(ds.text[[r]], TXT))[0]
    )
    np.testing.assert_array_equal(learner.reservoir.categories[TXT][n - 1], ds.labels[r].astype(bool))


def test_an_unlabelled_arrival_joins_the_reservoir_with_its_bank_categories_only_when_inferred(ds):
    r = int(STREAM[0])
    arrival = [ItemRecord(r, ds.image[r], None, None)]
    joined = {}
    for inferred in (True, False):
        learner = make_learner(ds, OFFLINE, theta=0.0, **{"reservoir.inferred": inferred})  # every row > theta
        learner.learn(arrival)
        joined[inferred] = learner.reservoir.size(IMG) - len(OFFLINE)
    assert joined == {True: 1, False: 0}


def pair_separation(learner: FpocmhLearner, ds: CrossModalDataset, rows: np.ndarray) -> float:
    """Mean inner product of the rows' image codes with the reservoir's stored text codes when they share
    a label, minus when they do not."""
    h = learner.model.relaxed(ds.image[rows], IMG)
    n = learner.reservoir.size(TXT)
    stored, cats = learner.reservoir.codes[TXT][:n].astype(np.float32), learner.reservoir.categories[TXT][:n]
    related = (ds.labels[rows].astype(bool)[:, None, :] & cats[None]).any(-1)
    inner = h @ stored.T
    return float(inner[related].mean() - inner[~related].mean())


def test_the_pairwise_term_pulls_arrivals_towards_the_stored_codes_of_related_items(ds):
    """With the anchor terms and both rehearsals off, only the pairwise term moves the networks: new images
    end up closer to the stored codes of texts that share a label and further from the others."""
    alone = {"alpha": 0.0, "beta": 0.0, "gamma": 0.0, **NO_CODE_REHEARSAL, **FAST}
    separation = {}
    for weight in (0.0, 1.0):
        learner = make_learner(ds, OFFLINE, **{"pairwise.weight": weight, **alone})
        learner.learn(unimodal_stream(ds, STREAM))
        separation[weight] = pair_separation(learner, ds, STREAM)
    assert separation[1.0] > separation[0.0] + 1.0


def test_the_pairwise_loss_is_reported_only_when_it_is_on(ds):
    on = make_learner(ds, OFFLINE).learn(unimodal_stream(ds, STREAM[:8])).losses
    off = make_learner(ds, OFFLINE, **NO_PAIRWISE).learn(unimodal_stream(ds, STREAM[:8])).losses
    assert on["pairwise"] > 0 and "pairwise" not in off


def test_stream_rehearsal_keeps_the_stored_codes_of_arrivals(ds):
    """Rehearsing the reservoir (offline items and arrivals) holds more of the arrivals' stored codes than
    rehearsing the offline sample alone."""
    first, later = unimodal_stream(ds, STREAM[:60]), unimodal_stream(ds, STREAM[60:])
    kept = {}
    for stream in (False, True):
        # The same batch from either source (half of the 120 offline items), so only the source differs.
        settings = {"code_rehearsal.stream": stream, "code_rehearsal.weight": 5.0, "code_rehearsal.batch": 60}
        learner = make_learner(ds, OFFLINE, **settings, **FAST)
        learner.learn(first)
        before = {m: learner.encode(features(ds, m)[STREAM[:60]], m) for m in MODALITIES}
        learner.learn(later)
        after = {m: learner.encode(features(ds, m)[STREAM[:60]], m) for m in MODALITIES}
        kept[stream] = 1 - np.mean([codes.bit_drift(before[m], after[m]) for m in MODALITIES])
    assert kept[True] > kept[False] + 0.02


def test_the_reservoir_is_checkpointed_but_not_published(ds):
    from fpocmh_core.learners.base import published

    state = make_learner(ds, OFFLINE, **STREAM_REHEARSAL).export_state()
    assert {"reservoir.code.img", "reservoir.features.txt"} <= set(state.tensors)
    assert not any(k.startswith("reservoir.") for k in published(state).tensors)


# --- learner codes ------------------------------------------------------------------------------


def test_every_view_learnt_is_coded_by_the_model_after_the_batch(ds):
    learner = make_learner(ds, OFFLINE, learner_codes_block=0, **FAST)
    batch = unimodal_stream(ds, STREAM[:12])
    before = {m: learner.encode(features(ds, m)[STREAM[:12]], m) for m in MODALITIES}
    report = learner.learn(batch)
    assert sorted((c.item_id, c.modality.short) for c in report.codes) == sorted(
        (r.item_id, m.short) for r in batch for m in r.modalities
    ), "one code per view learnt"
    for m in MODALITIES:
        got = np.stack([c.code for c in sorted(report.codes, key=lambda c: c.item_id) if c.modality is m])
        assert np.array_equal(got, learner.encode(features(ds, m)[STREAM[:12]], m)), "the model after the batch"
        assert not np.array_equal(got, before[m]), "which is not the model the arrivals met"


def test_a_view_the_learner_cannot_learn_from_keeps_the_encoders_code(ds):
    learner = make_learner(ds, OFFLINE, theta=1.0)  # no category from the bank: weight 0 when unlabelled
    unlabelled = unimodal_stream(ds, STREAM[:4], labelled=False)
    learner.learn(unlabelled)
    assert learner.uncoded == 0 and learner.flush().codes == []
    learner.learn(unimodal_stream(ds, STREAM[:4]))
    assert learner.uncoded == 8 and len(learner.flush().codes) == 8


def test_learnt_views_wait_for_a_full_block_then_the_model_of_that_moment_codes_them_all(ds):
    learner = make_learner(ds, OFFLINE, learner_codes_block=30, **FAST)
    first, second = unimodal_stream(ds, STREAM[:12]), unimodal_stream(ds, STREAM[12:18])
    assert learner.learn(first).codes == [] and learner.uncoded == 24
    report = learner.learn(second)
    assert learner.uncoded == 0
    assert sorted((c.item_id, c.modality.short) for c in report.codes) == sorted(
        (r.item_id, m.short) for r in first + second for m in r.modalities
    )
    for m in MODALITIES:
        got = np.stack([c.code for c in sorted(report.codes, key=lambda c: c.item_id) if c.modality is m])
        assert np.array_equal(got, learner.encode(features(ds, m)[STREAM[:18]], m)), "the model after the block"
    assert all(c.present == (c.modality,) for c in report.codes), "each code says what its arrival carried"


def test_a_flush_codes_the_views_that_wait_and_a_restored_state_still_holds_them(ds):
    learner = make_learner(ds, OFFLINE, learner_codes_block=1000, **FAST)
    learner.learn(unimodal_stream(ds, STREAM[:10]))
    clone = FpocmhLearner.from_state(ModelState.from_bytes(learner.export_state().to_bytes()))
    assert clone.uncoded == learner.uncoded == 20
    mine, theirs = learner.flush().codes, clone.flush().codes
    assert len(mine) == 20 and learner.uncoded == 0 and learner.flush().codes == []
    key = lambda c: (c.item_id, c.modality.short)  # noqa: E731
    for a, b in zip(sorted(mine, key=key), sorted(theirs, key=key), strict=True):
        assert key(a) == key(b) and np.array_equal(a.code, b.code) and a.present == b.present


def test_the_reservoir_rehearses_the_learner_code_once_written_with_stored_codes(ds):
    batch = unimodal_stream(ds, STREAM[:12])
    learner = {
        kept: make_learner(ds, OFFLINE, learner_codes_block=0, **{"reservoir.codes": kept}, **FAST)
        for kept in ("stored", "arrival")
    }
    written = {(c.item_id, c.modality): codes.unpack(c.code)[0] for c in learner["stored"].learn(batch).codes}
    learner["arrival"].learn(batch)
    without = make_learner(ds, OFFLINE, learner_codes=False, **FAST)
    without.learn(batch)
    for m in MODALITIES:
        slots = np.flatnonzero(np.isin(learner["stored"].reservoir.ids[m], STREAM[:12]))
        assert len(slots) == 12, "the reservoir is not full yet: every view has a slot"
        stored = learner["stored"].reservoir
        for slot in slots:
            np.testing.assert_array_equal(stored.codes[m][slot], written[(int(stored.ids[m][slot]), m)])
        np.testing.assert_array_equal(learner["arrival"].reservoir.codes[m], without.reservoir.codes[m])
        assert not np.array_equal(stored.codes[m], without.reservoir.codes[m]), "the two kinds of code differ"


def test_an_unlabelled_views_learner_code_is_written_but_not_rehearsed(ds):
    batch = unimodal_stream(ds, STREAM[:12], labelled=False)
    learner = make_learner(ds, OFFLINE, learner_codes_block=0, **FAST)
    without = make_learner(ds, OFFLINE, learner_codes=False, **FAST)
    report = learner.learn(batch)
    without.learn(batch)
    assert report.codes, "the bank gave some unlabelled views a category: they were learnt and coded"
    assert any(np.isin(learner.reservoir.ids[m], STREAM[:12]).any() for m in MODALITIES), "and kept in the reservoir"
    for m in MODALITIES:
        np.testing.assert_array_equal(learner.reservoir.codes[m], without.reservoir.codes[m])


def test_learner_codes_off_is_the_papers_form_and_a_state_from_before_them_loads_with_them_off(ds):
    assert make_learner(ds, OFFLINE, learner_codes=False).learn(unimodal_stream(ds, STREAM[:4])).codes == []
    state = make_learner(ds, OFFLINE).export_state()
    config = {k: v for k, v in state.meta["config"].items() if k != "learner_codes"}
    old = ModelState(state.method, state.version, state.parent_version, state.tensors, {**state.meta, "config": config})
    assert not FpocmhLearner.from_state(ModelState.from_bytes(old.to_bytes())).cfg.learner_codes


def test_a_state_from_before_blocks_codes_after_each_batch_and_rehearses_arrival_codes(ds):
    state = make_learner(ds, OFFLINE).export_state()
    config = {k: v for k, v in state.meta["config"].items() if k != "learner_codes_block"}
    config["reservoir"] = {k: v for k, v in config["reservoir"].items() if k != "codes"}
    tensors = {k: v for k, v in state.tensors.items() if not k.startswith("waiting.")}
    old = ModelState(state.method, state.version, state.parent_version, tensors, {**state.meta, "config": config})
    learner = FpocmhLearner.from_state(ModelState.from_bytes(old.to_bytes()))
    assert learner.cfg.learner_codes_block == 0 and learner.cfg.reservoir.codes == "arrival"
    assert len(learner.learn(unimodal_stream(ds, STREAM[:4])).codes) == 8 and learner.uncoded == 0


def test_a_state_from_before_schedule_restarts_and_the_self_check_loads_without_them(ds):
    state = make_learner(ds, OFFLINE).export_state()
    config = {**state.meta["config"]}
    since = ("restart_on_new_category", "restart_start", "new_category_weight", "self_check")
    for section in ("lr_schedule", "code_rehearsal"):
        config[section] = {k: v for k, v in config[section].items() if k not in since}
    old = ModelState(state.method, state.version, state.parent_version, state.tensors, {**state.meta, "config": config})
    cfg = FpocmhLearner.from_state(ModelState.from_bytes(old.to_bytes())).cfg
    assert not cfg.lr_schedule.restart_on_new_category
    assert cfg.lr_schedule.restart_start is None and cfg.code_rehearsal.new_category_weight is None
    assert cfg.lr_schedule.factor(0, new_category=True) == cfg.lr_schedule.start
    assert cfg.code_rehearsal.weight_for(new_category=True) == cfg.code_rehearsal.weight
    assert not cfg.code_rehearsal.self_checked


def test_a_state_from_before_the_reservoir_loads_and_learns_without_it(ds):
    state = make_learner(ds, OFFLINE).export_state()
    drop = ("reservoir", "pairwise")
    meta = {**state.meta, "config": {k: v for k, v in state.meta["config"].items() if k not in drop}}
    meta["config"]["code_rehearsal"] = {k: v for k, v in meta["config"]["code_rehearsal"].items() if k != "stream"}
    tensors = {k: v for k, v in state.tensors.items() if not k.startswith("reservoir.")}
    old = ModelState(state.method, state.version, state.parent_version, tensors, meta)
    learner = FpocmhLearner.from_state(ModelState.from_bytes(old.to_bytes()))
    assert learner.reservoir is None and learner.cfg.pairwise.weight == 0 and not learner.cfg.code_rehearsal.stream
    assert "pairwise" not in learner.learn(unimodal_stream(ds, STREAM[:8])).losses


# --- state and purity ---------------------------------------------------------------------------


def test_export_and_import_continue_identically_with_dropout(ds):
    learner = make_learner(ds, OFFLINE, dropout=0.3, mu=5)
    stream = unimodal_stream(ds, STREAM[:40])
    learner.learn(stream[:33])  # leaves partly filled windows and accumulated gradients behind
    state = ModelState.from_bytes(learner.export_state().to_bytes())
    clone = FpocmhLearner.from_state(state)
    for each in (learner, clone):
        each.learn(stream[33:])
    x = ds.image[STREAM[:20]]
    np.testing.assert_array_equal(learner.encode(x, IMG), clone.encode(x, IMG))
    for m in MODALITIES:
        assert same(params(learner, m), params(clone, m))
        np.testing.assert_array_equal(learner.bank.code[m], clone.bank.code[m])


def test_a_state_from_before_code_rehearsal_loads_and_learns_without_it(ds):
    state = make_learner(ds, OFFLINE, **NO_CODE_REHEARSAL).export_state()
    meta = {**state.meta, "config": {k: v for k, v in state.meta["config"].items() if k != "code_rehearsal"}}
    old = ModelState(state.method, state.version, state.parent_version, state.tensors, meta)
    learner = FpocmhLearner.from_state(ModelState.from_bytes(old.to_bytes()))
    assert learner.cfg.code_rehearsal.items == 0 and learner.replay == {}
    assert "replay" not in learner.learn(unimodal_stream(ds, STREAM[:8])).losses


def test_encode_is_pure(ds):
    learner = make_learner(ds, OFFLINE, dropout=0.3)
    learner.learn(unimodal_stream(ds, STREAM[:3]))
    before = learner.export_state()
    first = learner.encode(ds.text[STREAM], TXT)
    np.testing.assert_array_equal(first, learner.encode(ds.text[STREAM], TXT))
    after = learner.export_state()
    assert all(np.array_equal(before.tensors[k], after.tensors[k]) for k in before.tensors)


# --- the joint-space (paper) form ---------------------------------------------------------------


def test_joint_space_form_uses_zero_shot_vocabulary_and_promotes_new_words(tmp_path):
    ds = synthetic(space="joint", n_labels=4)
    centres = np.stack([ds.image[ds.labels[:, k] == 1].mean(0) for k in range(4)])
    vocab = np.vstack([centres[:3], -centres.sum(0), centres[3]])  # word 3 is far from everything
    path = tmp_path / "vocab.npy"
    np.save(path, vocab)
    offline = OFFLINE[ds.labels[OFFLINE, 3] == 0]  # nothing resembling word 4 offline
    learner = make_learner(ds, offline, category_embeddings=str(path), similarity_scale=10.0, theta=0.5)
    assert learner.space == "joint" and learner.bank.categories == [0, 1, 2]
    rows = [int(r) for r in STREAM if ds.labels[r].tolist() == [0, 0, 0, 1]][:2]
    learner.learn([ItemRecord(rows[0], ds.image[rows[0]], None, None)])
    assert 4 in learner.bank.pending and 4 not in learner.bank.categories
    learner.learn([ItemRecord(rows[1], None, ds.text[rows[1]], None)])
    assert learner.bank.categories == [0, 1, 2, 4]


def test_joint_space_cross_modal_target_comes_from_the_other_modalitys_anchors():
    ds = synthetic(space="joint")
    learner = make_learner(ds, OFFLINE)
    text_only = make_learner(ds, OFFLINE)
    # Move the image anchors far away: a text item's cross-modal target must change, its intra one not.
    text_only.bank.feat[IMG] = text_only.bank.feat[IMG][::-1].copy()
    r = int(STREAM[0])
    rec = ItemRecord(r, None, ds.text[r], None)
    _, a = learner._targets(rec, TXT, ds.text[r], None)
    _, b = text_only._targets(rec, TXT, ds.text[r], None)
    np.testing.assert_allclose(a.q_intra, b.q_intra)
    np.testing.assert_allclose(a.q_inter[::-1], b.q_inter, rtol=1e-5)


def test_separate_space_target_is_the_label_distribution_for_both_terms(ds):
    learner = make_learner(ds, OFFLINE)
    r = int(np.flatnonzero(ds.labels[:, 0] & ds.labels[:, 2])[0])
    _, t = learner._targets(ItemRecord(r, ds.image[r], None, ds.labels[r]), IMG, ds.image[r], None)
    np.testing.assert_allclose(t.q_intra, [0.5, 0, 0.5, 0])
    np.testing.assert_array_equal(t.q_inter, t.q_intra)
    np.testing.assert_array_equal(t.other_codes, learner.bank.code[TXT])


# --- behaviour on the real benchmark ----------------------------------------------------------


@pytest.fixture(scope="module")
def small_offline_model(mirflickr, p1):
    """A quickly trained offline model on a slice of the real P1 offline part."""
    cfg = load_offline_config(overrides={"hidden": [256], "epochs": 5, "eval_every": 5})
    return train_offline(TrainingSet.from_rows(mirflickr, p1.offline[:1500]), 32, cfg, progress=False).model


def stored_text_map_after_a_stream(mirflickr, p1, p1_config, offline_model, **overrides) -> float:
    """A short P1 stream at a high learning rate, then image queries from the moved networks against the
    offline part's texts as the offline model stored them."""
    offline = p1.offline[:1500]
    cfg = load_config(overrides={"logit_scale": 10.0, **REAL_FAST, **overrides})
    learner = FpocmhLearner.from_offline(copy.deepcopy(offline_model), mirflickr, offline, cfg)
    learner.learn(p1_chunk_records(mirflickr, p1, p1_config, 0)[:512])
    query = p1.query[:400]
    return evaluation.mean_average_precision(
        learner.encode(mirflickr.image[query], IMG),
        offline_model.encode(mirflickr.text[offline], TXT),
        mirflickr.labels[query],
        mirflickr.labels[offline],
    )


def test_rehearsal_protects_stored_code_retrieval_on_a_real_stream(mirflickr, p1, p1_config, small_offline_model):
    without, rehearsed = (
        stored_text_map_after_a_stream(mirflickr, p1, p1_config, small_offline_model, gamma=g, **NO_CODE_REHEARSAL)
        for g in (0.0, 20.0)
    )
    assert rehearsed > without + 0.01


def test_code_rehearsal_protects_stored_code_retrieval_on_a_real_stream(mirflickr, p1, p1_config, small_offline_model):
    """With the paper's anchor rehearsal on in both, adding stored-code rehearsal keeps more of the match."""
    without, rehearsed = (
        stored_text_map_after_a_stream(
            mirflickr, p1, p1_config, small_offline_model, **{"code_rehearsal.items": n, **OFFLINE_SAMPLE}
        )
        for n in (0, 1024)
    )
    assert rehearsed > without + 0.01
