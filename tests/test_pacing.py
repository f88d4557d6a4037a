"""The learner's pacing: a bounded lag by learning from a uniform sample of the backlog."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from pipeline_support import RoleThread, produce_arrivals, tiny_fpocmh_learner, wait_until

from consumers.learner.pacing import MIN_SHARE, Pacer, PacingConfig
from consumers.learner.role import run_learner
from fpocmh_core.protocols import p1_chunk_records


def test_the_share_shrinks_while_the_lag_is_over_its_bound_and_grows_back_under_half_of_it():
    pacer = Pacer(PacingConfig(max_lag_items=1000, max_lag_s=0, seed=0))
    shares = [pacer.update(5000, 0.0) for _ in range(5)]
    assert shares == sorted(shares, reverse=True) and shares[-1] < 0.3
    assert pacer.update(800, 0.0) == shares[-1], "between half the bound and the bound: hold"
    back = [pacer.update(100, 0.0) for _ in range(10)]
    assert back[-1] == 1.0
    for _ in range(100):
        pacer.update(10**9, 0.0)
    assert pacer.share == MIN_SHARE, "never stops learning altogether"


def test_a_bound_in_seconds_counts_too_and_no_bound_means_every_arrival_is_learnt():
    by_age = Pacer(PacingConfig(max_lag_items=0, max_lag_s=10.0, seed=0))
    assert by_age.update(10**9, 30.0) < 1.0
    free = Pacer(PacingConfig(max_lag_items=0, max_lag_s=0, seed=0))
    assert free.update(10**9, 10**6) == 1.0
    assert free.sample(list(range(7))) == list(range(7))


def test_the_sample_is_uniform_over_the_batch():
    pacer = Pacer(PacingConfig(max_lag_items=1, max_lag_s=0, seed=3))
    pacer.share = 0.2
    kept = np.zeros(1000)
    for _ in range(200):
        kept[pacer.sample(list(range(1000)))] += 1
    assert abs(kept.mean() / 200 - 0.2) < 0.01
    assert kept[:500].sum() / kept.sum() == pytest.approx(0.5, abs=0.02), "no position favoured"


@pytest.mark.broker
def test_a_burst_the_learner_cannot_keep_up_with_is_sampled_and_every_arrival_is_still_read(
    pipeline_cfg, mirflickr, p1, p1_config, tmp_path
):
    pacing = dataclasses.replace(pipeline_cfg.learner.pacing, max_lag_items=300)
    cfg = tiny_fpocmh_learner(
        pipeline_cfg, mirflickr, p1.offline, tmp_path, batch_size=100, publish_every_items=1000, pacing=pacing
    )
    burst = p1_chunk_records(mirflickr, p1, p1_config, 0)[:3000]
    produce_arrivals(cfg, burst)
    with RoleThread(run_learner, cfg) as running:
        topic = cfg.topics.arrivals
        wait_until(
            lambda: running.value("fpocmh_messages_consumed_total", role="learner", topic=topic) >= len(burst),
            120,
            "the whole burst read",
        )
        skipped = running.value("fpocmh_learner_items_total", outcome="skipped")
        assert 0 < skipped < len(burst), "learnt from a sample, not from nothing"
        wait_until(
            lambda: running.value("fpocmh_model_version", role="learner") >= 2, 60, "versions keep their cadence"
        )
