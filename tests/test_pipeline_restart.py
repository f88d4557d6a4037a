"""An encoder process stopped with SIGTERM mid-stream and started again loses nothing and writes no
conflicting code."""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys

import pytest
from confluent_kafka import OFFSET_BEGINNING
from pipeline_support import codes_of, model_state, produce_arrivals, publish, read_all, read_topic, wait_until

from consumers import settings
from consumers.kafka import assign_all, make_consumer
from fpocmh_core import schemas
from fpocmh_core.protocols import p1_chunk_records

pytestmark = pytest.mark.broker


def start_encoder(config_path, log_path) -> subprocess.Popen:
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "fpocmh", "encode", "--config", str(config_path)], stdout=log, stderr=log
        )


def test_an_encoder_stopped_with_sigterm_and_restarted_loses_no_item_and_writes_no_conflicting_code(
    pipeline_cfg, mirflickr, p1, p1_config, tmp_path
):
    # Small batches make the encoder slow enough to be stopped in the middle of the stream.
    cfg = dataclasses.replace(pipeline_cfg, encoder=dataclasses.replace(pipeline_cfg.encoder, batch_size=10))
    config_path = settings.dump(cfg, tmp_path / "pipeline.yaml")
    records = [r for c in (1, 2, 3) for r in p1_chunk_records(mirflickr, p1, p1_config, c)]
    keys = {schemas.code_key(r.item_id, m) for r in records for m in r.modalities}
    publish(cfg, model_state(mirflickr.dims, cfg.bits))
    produce_arrivals(cfg, records)

    log = tmp_path / "encoder.log"
    first = start_encoder(config_path, log)
    watcher = make_consumer(cfg, "test", None, 10)
    assign_all(watcher, cfg.topics.codes, OFFSET_BEGINNING)
    seen = []

    def coded_so_far() -> int:
        seen.extend(m for m in watcher.consume(1000, 0.05) if m.error() is None)
        return len(seen)

    try:
        wait_until(lambda: coded_so_far() >= 300, timeout_s=90, what="first codes")
        first.send_signal(signal.SIGTERM)
        assert first.wait(30) == 0, log.read_text()
    finally:
        first.kill()
        watcher.close()
    coded_before_restart = len(read_all(cfg, cfg.topics.codes))
    assert coded_before_restart < len(keys), "the encoder was stopped mid-stream"
    assert "SIGTERM received" in log.read_text()

    second = start_encoder(config_path, log)
    try:
        read_topic(cfg, cfg.topics.codes, len(keys), timeout_s=120)
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0
    finally:
        second.kill()
    stored = codes_of(read_all(cfg, cfg.topics.codes))

    assert len(stored) == len(keys), "no item coded twice"
    assert {c.key for c in stored} == keys, "no item lost"
    assert {c.model_version for c in stored} == {0}
