"""Bad input and faults through a real broker: dead letters with reasons, roles that keep running, model
updates that can't be hijacked, broker loss and restarted streams that are loud, one-line CLI errors."""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from confluent_kafka import Producer
from pipeline_support import (
    RoleThread,
    checked_model_state,
    codes_of,
    fresh_metrics,
    produce_arrivals,
    publish,
    read_topic,
    tiny_fpocmh_learner,
    wait_until,
)

from consumers import kafka, settings
from consumers.brokers.process import free_port
from consumers.brokers.tansu import EmbeddedBroker
from consumers.encoder.role import run_encoder
from consumers.handlers import Decoded
from consumers.health import BrokerLost
from consumers.learner.role import run_learner
from consumers.runtime import RoleStopped, Runtime
from fpocmh_core import schemas
from fpocmh_core.learners.base import model_from_state
from fpocmh_core.model_check import Probe
from fpocmh_core.protocols import p1_chunk_records
from fpocmh_core.records import ItemRecord
from fpocmh_core.state import ModelState

pytestmark = pytest.mark.broker

U8 = schemas.WireDtypes(labels=schemas.dtype_code(np.uint8))


def bad_arrivals(ds) -> list[tuple[str, bytes, list]]:
    """(reason expected, value, headers) of one arrival of every bad kind, item ids 900000+."""
    img, txt, lab = ds.image[0].copy(), ds.text[0].copy(), ds.labels[0].copy()
    nan_img, inf_txt = img.copy(), txt.astype(np.float32)
    nan_img[0], inf_txt[0] = np.nan, np.inf
    cases = [
        ("invalid", ItemRecord(900001, nan_img, None, lab)),
        ("invalid", ItemRecord(900002, None, inf_txt, lab)),
        ("shape", ItemRecord(900003, img[:-1], None, lab)),
        ("shape", ItemRecord(900004, img, None, np.ones(ds.n_labels + 3, np.uint8))),
        ("invalid", ItemRecord(900005, img, txt, (lab * 2).astype(np.uint8))),
        ("invalid", ItemRecord(-7, img, None, lab)),
    ]
    out = [(reason, *schemas.encode_arrival(rec, U8)) for reason, rec in cases]
    out.append(("decode", b"\x01\x02 not an arrival", schemas.ARRIVAL_HEADERS))
    # Over the pipeline's message limit (1,000,000 B) yet under Kafka's default broker limit, so the broker
    # takes it and the encoder must not try to send it whole to the dead-letter topic.
    huge = ItemRecord(900008, np.ones(255_000, np.float32), None, None)
    out.append(("oversize", *schemas.encode_arrival(huge)))
    return out


def produce_big(cfg, values: list[tuple[bytes, list]]) -> None:
    producer = Producer({"bootstrap.servers": cfg.bootstrap_servers, "message.max.bytes": 2_000_000})
    for value, headers in values:
        producer.produce(cfg.topics.arrivals, value, key=b"bad", headers=headers)
    assert producer.flush(30) == 0


def reasons_of(dead) -> list[str]:
    return sorted(schemas.header(m.headers(), schemas.DLQ_REASON).decode() for m in dead)


def test_bad_arrivals_of_every_kind_are_dead_lettered_with_their_reason_and_every_valid_one_is_coded_once(
    pipeline_cfg, mirflickr, p1, p1_config
):
    cfg = pipeline_cfg
    publish(cfg, checked_model_state(mirflickr, cfg.bits))
    valid = p1_chunk_records(mirflickr, p1, p1_config, 0)[:200]
    bad = bad_arrivals(mirflickr)
    keys = {schemas.code_key(r.item_id, m) for r in valid for m in r.modalities}
    with RoleThread(run_encoder, cfg) as encoder:
        produce_arrivals(cfg, valid[:100])
        produce_big(cfg, [(v, h) for _r, v, h in bad])
        produce_arrivals(cfg, valid[100:])
        stored = codes_of(read_topic(cfg, cfg.topics.codes, len(keys)))
        dead = read_topic(cfg, cfg.topics.dead_letters, len(bad))
        time.sleep(1.0)  # anything coded late would show up now

    assert encoder.error is None, "the encoder never stopped"
    assert sorted(c.key for c in codes_of(read_topic(cfg, cfg.topics.codes, len(keys)))) == sorted(keys)
    assert {c.item_id for c in stored} <= {r.item_id for r in valid}, "no bad arrival was coded"
    assert reasons_of(dead) == sorted(r for r, _v, _h in bad)
    oversize = next(m for m in dead if schemas.header(m.headers(), schemas.DLQ_REASON) == b"oversize")
    original = bad[-1][1]
    assert schemas.header(oversize.headers(), schemas.DLQ_TRUNCATED) == b"1"
    assert int(schemas.header(oversize.headers(), schemas.DLQ_SIZE)) == len(original)
    assert schemas.header(oversize.headers(), schemas.DLQ_SHA256).decode() == hashlib.sha256(original).hexdigest()
    assert oversize.value() == original[: len(oversize.value())] and len(oversize.value()) < 10_000
    for reason in ("invalid", "shape", "decode", "oversize"):
        want = sum(r == reason for r, _v, _h in bad)
        assert encoder.value("fpocmh_dead_letters_total", role="encoder", reason=reason) == want


@pytest.fixture
def learner_cfg(pipeline_cfg, mirflickr, p1, tmp_path):
    return tiny_fpocmh_learner(
        pipeline_cfg, mirflickr, p1.offline, tmp_path, publish_every_items=100, publish_every_s=0.0, batch_size=50
    )


def test_the_learner_dead_letters_bad_arrivals_never_learns_them_and_publishes_only_finite_models(
    learner_cfg, mirflickr, p1, p1_config
):
    cfg = learner_cfg
    valid = p1_chunk_records(mirflickr, p1, p1_config, 0)[:300]
    bad = [b for b in bad_arrivals(mirflickr) if b[0] != "oversize"]
    with RoleThread(run_learner, cfg) as learner:
        produce_arrivals(cfg, valid[:150])
        produce_big(cfg, [(v, h) for _r, v, h in bad])
        produce_arrivals(cfg, valid[150:])
        dead = read_topic(cfg, cfg.topics.dead_letters, len(bad))
        wait_until(lambda: learner.value("fpocmh_model_version", role="learner") >= 2, what="versions after them")
    assert learner.error is None
    assert reasons_of(dead) == sorted(r for r, _v, _h in bad)
    assert all(schemas.header(m.headers(), schemas.DLQ_ROLE) == b"learner" for m in dead)
    assert learner.value("fpocmh_learner_rollbacks_total") == 0, "checked at the door, nothing to roll back"
    newest = read_topic(cfg, cfg.topics.models, 1)
    assert newest, "versions were published"
    from consumers.learner.publisher import Checkpoints

    state, _offsets, _ids = Checkpoints(cfg.learner.checkpoint_dir).latest()
    assert all(bool(torch.isfinite(p).all()) for p in model_from_state(state).parameters())
    assert Probe.of(state) is not None, "every version carries the probe"


def forged_parts(state: ModelState, claimed: int) -> list[schemas.ModelPart]:
    return schemas.split_model_update(state.to_bytes(), claimed, state.parent_version, 500_000)


def produce_parts(cfg, parts: list[schemas.ModelPart]) -> None:
    rt = Runtime(cfg, "test", fresh_metrics())
    for part in parts:
        rt.produce(
            cfg.topics.models,
            schemas.encode_model_part(part),
            schemas.model_part_key(part),
            schemas.model_part_headers(part),
        )
    rt.flush()


def test_an_update_whose_part_headers_claim_another_version_is_refused_and_genuine_later_ones_still_apply(
    pipeline_cfg, mirflickr
):
    cfg = pipeline_cfg
    publish(cfg, checked_model_state(mirflickr, cfg.bits, version=0))
    with RoleThread(run_encoder, cfg) as encoder:
        wait_until(lambda: encoder.value("fpocmh_model_updates_total", role="encoder") == 1, what="version 0")
        produce_parts(cfg, forged_parts(checked_model_state(mirflickr, cfg.bits, version=1, seed=1), claimed=999))
        wait_until(
            lambda: encoder.value("fpocmh_model_refused_total", role="encoder") == 1, what="the forged one refused"
        )
        publish(cfg, checked_model_state(mirflickr, cfg.bits, version=2, seed=2))
        wait_until(lambda: encoder.value("fpocmh_model_version", role="encoder") == 2, what="version 2 applied")
        dead = read_topic(cfg, cfg.topics.dead_letters, 1)
    assert b"state inside says version 1" in schemas.header(dead[0].headers(), schemas.DLQ_DETAIL)


def test_with_a_key_only_updates_signed_with_it_are_applied(pipeline_cfg, mirflickr):
    signed = dataclasses.replace(
        pipeline_cfg, security=dataclasses.replace(pipeline_cfg.security, model_key="k-right", model_key_file="")
    )
    other = dataclasses.replace(
        pipeline_cfg, security=dataclasses.replace(pipeline_cfg.security, model_key="k-wrong", model_key_file="")
    )
    publish(signed, checked_model_state(mirflickr, signed.bits, version=0))
    with RoleThread(run_encoder, signed) as encoder:
        wait_until(lambda: encoder.value("fpocmh_model_version", role="encoder") == 0, what="signed version 0")
        publish(pipeline_cfg, checked_model_state(mirflickr, signed.bits, version=1, seed=1))
        publish(other, checked_model_state(mirflickr, signed.bits, version=2, seed=2))
        wait_until(lambda: encoder.value("fpocmh_model_refused_total", role="encoder") == 2, what="two refusals")
        publish(signed, checked_model_state(mirflickr, signed.bits, version=3, seed=3))
        wait_until(lambda: encoder.value("fpocmh_model_version", role="encoder") == 3, what="signed version 3")
        dead = read_topic(signed, signed.topics.dead_letters, 2)
    details = sorted(schemas.header(m.headers(), schemas.DLQ_DETAIL).decode() for m in dead)
    assert "unsigned" in details[0] and "wrong signature" in details[1]
    assert encoder.value("fpocmh_model_updates_total", role="encoder") == 2, "versions 0 and 3 only"


def test_a_collapsed_or_non_finite_version_is_refused_and_the_encoder_keeps_coding_with_its_own(
    pipeline_cfg, mirflickr, p1, p1_config
):
    cfg = pipeline_cfg
    good = checked_model_state(mirflickr, cfg.bits, version=0)
    publish(cfg, good)
    collapsed = dict(good.tensors)
    last = max(k for k in collapsed if k.startswith("model.image.body.") and k.endswith(".weight"))
    collapsed[last] = np.zeros_like(collapsed[last])
    collapsed[last.replace("weight", "bias")] = np.full_like(collapsed[last.replace("weight", "bias")], 0.2)
    nan = dict(good.tensors)
    nan[last] = np.full_like(nan[last], np.nan)
    records = p1_chunk_records(mirflickr, p1, p1_config, 0)[:60]
    with RoleThread(run_encoder, cfg) as encoder:
        wait_until(lambda: encoder.value("fpocmh_model_updates_total", role="encoder") == 1, what="version 0")
        publish(cfg, dataclasses.replace(good, version=1, parent_version=0, tensors=collapsed))
        publish(cfg, dataclasses.replace(good, version=2, parent_version=1, tensors=nan))
        wait_until(lambda: encoder.value("fpocmh_model_refused_total", role="encoder") == 2, what="both refused")
        produce_arrivals(cfg, records)
        stored = codes_of(read_topic(cfg, cfg.topics.codes, sum(len(r.modalities) for r in records)))
        dead = read_topic(cfg, cfg.topics.dead_letters, 2)
    assert {c.model_version for c in stored} == {0}
    details = " ".join(schemas.header(m.headers(), schemas.DLQ_DETAIL).decode() for m in dead)
    assert "collapsed" in details and "non-finite" in details


class Picky:
    """A handler that raises on one message: what a processing bug does to a batch."""

    def __init__(self, rt: Runtime, out_topic: str) -> None:
        self.rt, self.out_topic = rt, out_topic

    def decode(self, msg):
        return msg.value()

    def process(self, batch: list[Decoded]) -> None:
        if any(d.value == b"poison" for d in batch):
            raise ZeroDivisionError("processing bug")
        for d in batch:
            self.rt.produce(self.out_topic, d.value)

    def idle(self) -> None:
        pass


def test_a_message_whose_processing_raises_is_isolated_and_dead_lettered_and_its_batch_mates_go_through(
    pipeline_cfg,
):
    cfg = pipeline_cfg
    values = [f"m{i}".encode() for i in range(30)]
    values.insert(17, b"poison")
    rt = Runtime(cfg, "encoder", fresh_metrics())
    for v in values:
        rt.produce(cfg.topics.arrivals, v, key=b"k")  # one key: one partition, one batch
    rt.flush()
    consumer = kafka.make_consumer(cfg, "encoder", cfg.encoder.group, 10)
    consumer.subscribe([cfg.topics.arrivals])
    worker = threading.Thread(target=rt.run, args=(consumer, Picky(rt, cfg.topics.results), 100, 0.2))
    worker.start()
    try:
        out = read_topic(cfg, cfg.topics.results, 30)
        dead = read_topic(cfg, cfg.topics.dead_letters, 1)
    finally:
        rt.stop.set()
        worker.join(30)
    assert sorted(m.value() for m in out) == sorted(v for v in values if v != b"poison")
    assert dead[0].value() == b"poison" and reasons_of(dead) == ["process"]
    assert b"ZeroDivisionError" in schemas.header(dead[0].headers(), schemas.DLQ_DETAIL)


def test_a_role_shows_the_lost_broker_and_its_return_and_stops_after_the_loss_timeout(tmp_path, mirflickr, caplog):
    port = free_port()
    broker = EmbeddedBroker(port=port, log_path=tmp_path / "tansu.log")
    bootstrap = broker.start()
    try:
        cfg = settings.load(None, ["broker.loss_timeout_s=6", "encoder.metrics_port=0"], bootstrap, environ={})
        kafka.ensure_topics(cfg)
        publish(cfg, checked_model_state(mirflickr, cfg.bits))
        with RoleThread(run_encoder, cfg) as encoder:
            wait_until(lambda: encoder.value("fpocmh_model_updates_total", role="encoder") == 1, what="running")
            assert encoder.value("fpocmh_broker_up", role="encoder") == 1
            broker.proc.kill()
            broker.proc.wait()
            wait_until(lambda: encoder.value("fpocmh_broker_up", role="encoder") == 0, 30, "the outage shown")
            broker = EmbeddedBroker(port=port, log_path=tmp_path / "tansu.log")
            broker.start()
            wait_until(lambda: encoder.value("fpocmh_broker_up", role="encoder") == 1, 30, "the return shown")
            broker.stop()
            wait_until(lambda: encoder.error is not None, 60, "the role stopping after the loss timeout")
            assert isinstance(encoder.error, BrokerLost)
            encoder.error = None  # raised on purpose; the block must not re-raise it
    finally:
        broker.stop()
    lines = [r.getMessage() for r in caplog.records if r.name == "consumers.health"]
    assert any("lost the broker" in line and "stopping after 6 s" in line for line in lines)
    assert any("is back after" in line for line in lines)


def test_a_learner_whose_checkpoint_read_another_incarnation_of_the_topic_stops_or_starts_it_over(
    learner_cfg, mirflickr, p1, p1_config
):
    cfg = learner_cfg
    first = p1_chunk_records(mirflickr, p1, p1_config, 0)[:120]
    with RoleThread(run_learner, cfg) as learner:
        produce_arrivals(cfg, first)
        wait_until(
            lambda: learner.value("fpocmh_messages_consumed_total", role="learner", topic=cfg.topics.arrivals) >= 120
        )
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(kafka.admin_config(cfg))
    admin.delete_topics([cfg.topics.arrivals])[cfg.topics.arrivals].result(30)
    wait_until(lambda: cfg.topics.arrivals not in admin.list_topics(timeout=5).topics, 30, "topic deleted")
    kafka.ensure_topics(cfg)
    again = p1_chunk_records(mirflickr, p1, p1_config, 1)[:40]
    produce_arrivals(cfg, again)

    with pytest.raises(RoleStopped, match="on_topic_reset=earliest"):
        run_learner(cfg, fresh_metrics(), threading.Event())
    restarted = dataclasses.replace(cfg, learner=dataclasses.replace(cfg.learner, on_topic_reset="earliest"))
    with RoleThread(run_learner, restarted) as learner:
        wait_until(lambda: consumed(learner, cfg) >= 40, what="the new topic read from its beginning")
        assert learner.value("fpocmh_topic_resets_total", role="learner", topic=cfg.topics.arrivals) == 1


def consumed(role: RoleThread, cfg) -> float:
    return role.value("fpocmh_messages_consumed_total", role="learner", topic=cfg.topics.arrivals)


def one_line_error(argv: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "fpocmh", *argv], capture_output=True, text=True, timeout=120)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"fpocmh {argv[0]}: error: ")
    return done


def test_an_unreachable_broker_is_one_line_naming_the_address():
    address = f"127.0.0.1:{free_port()}"
    done = one_line_error(["topics", "--bootstrap", address, "--set", "broker.connect_timeout_s=2"])
    assert done.returncode == 3
    assert f"no Kafka broker answered at {address} within 2 s" in done.stderr


def test_a_truncated_dataset_is_one_line_naming_the_file(benchmark_path, tmp_path):
    truncated = tmp_path / "cut.npz"
    truncated.write_bytes(benchmark_path.read_bytes()[:5_000_000])
    done = one_line_error(["train", "--data", str(truncated), "--out", str(tmp_path / "m")])
    assert done.returncode == 2 and str(truncated) in done.stderr and "truncated or corrupt" in done.stderr
