"""The learner role against a real broker: versions it publishes reach the encoder, and a restarted
learner resumes from its checkpoint without learning any item twice.

The method comes from the pipeline config (``fpocmh`` by default); models are trained for one epoch on
a few hundred pairs, since quality is not under test.
"""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
from pipeline_support import RoleThread, codes_of, produce_arrivals, read_all, read_codes_until, wait_until

from consumers.encoder.role import run_encoder
from consumers.learner.publisher import Checkpoints
from consumers.learner.role import run_learner
from fpocmh_core import schemas
from fpocmh_core.learners.fpocmh import load_config
from fpocmh_core.learners.registry import learner_class, learner_from_state
from fpocmh_core.protocols import p1_chunk_records
from fpocmh_core.state import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.broker

# The smallest training each method accepts: one epoch on the bootstrap rows.
TINY = {
    "fpocmh": {"offline": {"epochs": 1}},
    "dlch": {"original.epochs": 1, "lifelong.epochs": 1, "lifelong.omega": 200, "lifelong.reservoir": 300},
}


@pytest.fixture
def learner_cfg(pipeline_cfg, mirflickr, p1, tmp_path):
    method = pipeline_cfg.method
    learner = learner_class(method).bootstrap(mirflickr, p1.offline[:300], pipeline_cfg.bits, TINY[method], False)
    init = save_checkpoint(learner.export_state(), tmp_path / "v0")
    role = dataclasses.replace(
        pipeline_cfg.learner, init=str(init), publish_every_items=100, publish_every_s=0.0, batch_size=50
    )
    return dataclasses.replace(pipeline_cfg, learner=role)


def skip_unless_learner_codes(cfg) -> None:
    if cfg.method != "fpocmh" or not load_config(overrides=TINY["fpocmh"]).learner_codes:
        pytest.skip("FPO-CMH with learner_codes (the default) codes every view it learnt")


def pausing(cfg, **learner):
    """The learner codes the views it learnt one second after the last arrival (blocks of
    ``learner_codes_block`` views would not fill on these short streams)."""
    return dataclasses.replace(cfg, learner=dataclasses.replace(cfg.learner, flush_after_s=1.0, **learner))


def coded_when_paused(learner: RoleThread, items: int) -> None:
    """Wait until the learner has learnt ``items`` arrivals and, the stream having paused, coded every view."""
    wait_until(lambda: learner.value("fpocmh_learner_items_total", outcome="learned") >= items, what="learnt")
    assert learner.value("fpocmh_learner_views_uncoded") > 0, "the views wait for a block or a pause"
    wait_until(lambda: learner.value("fpocmh_learner_views_uncoded") == 0, what="the pause coding the views")
    time.sleep(0.5)  # the codes are held right after the gauge drops


def consumed(role: RoleThread, cfg) -> float:
    return role.value("fpocmh_messages_consumed_total", role="learner", topic=cfg.topics.arrivals)


def checkpointed_items(cfg) -> tuple[int, int]:
    """(version, arrivals whose effect the newest checkpoint holds)."""
    directory = Checkpoints(cfg.learner.checkpoint_dir).directory
    manifest = json.loads((directory / (directory / "LATEST").read_text() / "manifest.json").read_text())
    return manifest["version"], sum(sum(parts.values()) for parts in manifest["offsets"].values())


def test_the_encoder_codes_later_items_with_a_version_the_learner_published(learner_cfg, mirflickr, p1, p1_config):
    cfg = learner_cfg
    first = p1_chunk_records(mirflickr, p1, p1_config, 0)[:150]
    later = p1_chunk_records(mirflickr, p1, p1_config, 1)[:100]
    with RoleThread(run_encoder, cfg) as encoder, RoleThread(run_learner, cfg) as learner:
        produce_arrivals(cfg, first)
        wait_until(lambda: learner.value("fpocmh_model_version", role="learner") >= 1, what="learner publishing v1")
        wait_until(lambda: encoder.value("fpocmh_model_version", role="encoder") >= 1, what="encoder applying v1")
        produce_arrivals(cfg, later)
        later_keys = {schemas.code_key(r.item_id, m) for r in later for m in r.modalities}
        codes = read_codes_until(cfg, later_keys)
        published = learner.value("fpocmh_model_version", role="learner")

    versions = {c.model_version for c in codes if c.key in later_keys and c.source == "encoder"}
    assert versions and min(versions) >= 1, "items after the update carry the learner's version"
    assert max(versions) <= published


def test_learner_codes_wait_for_the_encoders_and_stay_the_last_code_of_each_view(learner_cfg, mirflickr, p1, p1_config):
    cfg = pausing(learner_cfg)
    skip_unless_learner_codes(cfg)
    items = p1_chunk_records(mirflickr, p1, p1_config, 0)[:150]
    views = {schemas.code_key(r.item_id, m) for r in items for m in r.modalities}
    produce_arrivals(cfg, items)
    with RoleThread(run_learner, cfg) as learner:
        coded_when_paused(learner, len(items))
        held = learner.value("fpocmh_learner_codes_held")
        assert not codes_of(read_all(cfg, cfg.topics.codes)), "no encoder has coded them yet: nothing written"
        with RoleThread(run_encoder, cfg):
            read_codes_until(cfg, views)
            wait_until(
                lambda: learner.value("fpocmh_learner_codes_total", outcome="written") == held,
                what="the held codes written once the encoder committed",
            )
        assert learner.value("fpocmh_learner_codes_held") == 0

    codes = codes_of(read_all(cfg, cfg.topics.codes))
    by_learner = [i for i, c in enumerate(codes) if c.source == "learner"]
    assert len(by_learner) == held > 0
    last = {c.key: c for c in codes}
    for i in by_learner:
        key = codes[i].key
        assert key in views
        assert any(c.key == key and c.source == "encoder" for c in codes[:i]), "the encoder's code came first"
        assert last[key].source == "learner", "and the learner's is the one the compacted topic keeps"


def test_learner_codes_beyond_the_bound_or_at_a_stop_are_dropped_and_counted(learner_cfg, mirflickr, p1, p1_config):
    cfg = pausing(learner_cfg, max_held_codes=20)
    skip_unless_learner_codes(cfg)
    items = p1_chunk_records(mirflickr, p1, p1_config, 0)[:100]
    produce_arrivals(cfg, items)
    with RoleThread(run_learner, cfg) as learner:  # no encoder: nothing is ever committed past
        coded_when_paused(learner, len(items))
        assert 0 < learner.value("fpocmh_learner_codes_held") <= 20
        assert learner.value("fpocmh_learner_codes_total", outcome="dropped") > 0
    assert learner.value("fpocmh_learner_codes_held") == 0
    assert learner.value("fpocmh_learner_codes_total", outcome="written") == 0
    assert not codes_of(read_all(cfg, cfg.topics.codes)), "a view whose encoder code is not there gets none"


def test_a_restarted_learner_resumes_from_its_checkpoint_and_offsets(learner_cfg, mirflickr, p1, p1_config):
    cfg = learner_cfg
    before = p1_chunk_records(mirflickr, p1, p1_config, 0)[:250]
    after = p1_chunk_records(mirflickr, p1, p1_config, 1)[:50]
    with RoleThread(run_learner, cfg) as learner:
        produce_arrivals(cfg, before)
        wait_until(lambda: consumed(learner, cfg) >= len(before), what="learner reading the first items")
    version, items = checkpointed_items(cfg)
    assert items == len(before), "a clean stop checkpoints everything learnt"
    assert version >= 2, "one version per 100 items, and a last one on stop"

    produce_arrivals(cfg, after)
    with RoleThread(run_learner, cfg) as resumed:
        wait_until(lambda: consumed(resumed, cfg) >= len(after), what="resumed learner reading new items")
        started_at = resumed.value("fpocmh_model_version", role="learner")
    assert consumed(resumed, cfg) == len(after), "nothing before the checkpoint is learnt again"
    assert started_at >= version
    assert checkpointed_items(cfg) == (version + 1, len(before) + len(after))


def test_the_bank_size_gauge_shows_the_held_bank_from_start_up_to_after_the_stop(learner_cfg):
    cfg = learner_cfg
    state, _manifest = load_checkpoint(cfg.learner.init)
    rows = learner_from_state(state).bank_rows
    if rows is None:
        pytest.skip(f"{cfg.method} keeps no anchor bank")
    with RoleThread(run_learner, cfg) as learner:
        wait_until(lambda: learner.value("fpocmh_model_updates_total", role="learner") >= 1, what="version 0 out")
        assert learner.value("fpocmh_bank_rows") == rows > 0, "set from the restored state, before any arrival"
    assert learner.value("fpocmh_bank_rows") == rows, "a stop does not reset it"
