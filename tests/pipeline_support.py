"""Helpers for the broker tests: roles in threads, producing arrivals, reading topics to a count."""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, Message, TopicPartition
from prometheus_client import CollectorRegistry

from consumers import settings
from consumers.kafka import TOPIC_NAMES, assign_all, ensure_topics, make_consumer, make_producer, partitions_of
from consumers.metrics import Metrics
from consumers.models import publish_model
from consumers.query.client import QueryClient
from consumers.runtime import Runtime
from consumers.settings import PipelineConfig
from fpocmh_core import schemas
from fpocmh_core.model_check import Probe
from fpocmh_core.nets import HashModel
from fpocmh_core.records import ItemRecord
from fpocmh_core.state import ModelState


def isolated_config(bootstrap: str, tmp_path: Path, sets: Sequence[str] = ()) -> PipelineConfig:
    """The pipeline config on ``bootstrap`` with a test's own topics (created), groups and checkpoint
    folder, then ``sets`` (``key=value`` overrides)."""
    tag = uuid.uuid4().hex[:10]
    base = [f"topics.{name}=test-{tag}.{name}" for name in TOPIC_NAMES]
    base += [f"{role}.group=test-{tag}-{role}" for role in ("encoder", "learner", "query")]
    base += [
        f"learner.checkpoint_dir={tmp_path / 'learner'}",
        f"query.snapshot_dir={tmp_path / 'query-snapshots'}",
        # Short fetch waits and polls: tests wait on round trips, not on throughput.
        "encoder.fetch_wait_max_ms=10",
        "learner.fetch_wait_max_ms=10",
        "encoder.poll_timeout_s=0.05",
        "learner.poll_timeout_s=0.05",
    ]
    # No /metrics servers: tests read their Metrics objects directly, and ports would clash across tests.
    base += [f"{section}.metrics_port=0" for section in ("encoder", "learner", "query", "replay")]
    cfg = settings.load(None, [*base, *sets], bootstrap, environ={})
    ensure_topics(cfg)
    return cfg


def fresh_metrics() -> Metrics:
    return Metrics(CollectorRegistry())


def model_state(dims: tuple[int, int], bits: int, version: int = 0, seed: int = 0) -> ModelState:
    """A hash model's state as the encoder and query roles read it (untrained: quality is not under test)."""
    model = HashModel.create(dims, bits, hidden=(64,), seed=seed)
    parent = None if version == 0 else version - 1
    return ModelState("naive", version, parent, model.tensors(), {"arch": model.arch()})


def checked_model_state(ds: Any, bits: int, version: int = 0, seed: int = 0) -> ModelState:
    """An untrained model that passes the model check (inputs scaled to the data), with a probe set from
    the data: what a role needs to check arrivals (label count) and later versions."""
    model = HashModel.create(ds.dims, bits, hidden=(64,), seed=seed)
    model.image.fit_scaler(ds.image[:2000])
    model.text.fit_scaler(ds.text[:2000], per_feature=False)
    parent = None if version == 0 else version - 1
    state = ModelState("naive", version, parent, model.tensors(), {"arch": model.arch()})
    return Probe.draw(ds.image[:4000], ds.text[:4000], ds.n_labels, 256).attach(state)


def tiny_fpocmh_learner(
    cfg: PipelineConfig, ds: Any, offline: np.ndarray, tmp_path: Path, **learner: Any
) -> PipelineConfig:
    """``cfg`` whose learner starts from an FPO-CMH version 0 trained for one epoch on 300 offline pairs, with
    a probe set, and with ``learner`` settings changed.

    Such a backbone is too weak to keep its text codes from collapsing under online learning (measured:
    61-67% of the bits constant on the probe after one chunk, where a fully trained version 0 keeps 2%), so
    the model check, which would rightly refuse its versions, is off here: these tests are about other things.
    """
    from fpocmh_core.learners.registry import learner_class
    from fpocmh_core.model_check import ModelCheckConfig
    from fpocmh_core.state import save_checkpoint

    state = learner_class("fpocmh").bootstrap(ds, offline[:300], cfg.bits, {"offline": {"epochs": 1}}, False)
    probe = Probe.draw(ds.image[offline], ds.text[offline], ds.n_labels, 256)
    init = save_checkpoint(probe.attach(state.export_state()), tmp_path / "v0")
    role = dataclasses.replace(cfg.learner, init=str(init), **learner)
    permissive = ModelCheckConfig(cfg.model_check.probe_items, min_distinct_share=0.0, max_constant_bit_share=1.0)
    return dataclasses.replace(cfg, method="fpocmh", learner=role, model_check=permissive)


def publish(cfg: PipelineConfig, state: ModelState) -> None:
    rt = Runtime(cfg, "learner", fresh_metrics())
    publish_model(rt, state)
    rt.flush()


def produce_arrivals(cfg: PipelineConfig, records: Sequence[ItemRecord]) -> None:
    rt = Runtime(cfg, "replay", fresh_metrics())
    for r in records:
        value, headers = schemas.encode_arrival(r)
        rt.produce(cfg.topics.arrivals, value, key=str(r.item_id).encode(), headers=headers)
    rt.flush()


def produce_raw(cfg: PipelineConfig, topic: str, value: bytes, headers: list[tuple[str, bytes]] | None) -> None:
    rt = Runtime(cfg, "replay", fresh_metrics())
    rt.produce(topic, value, key=b"bad", headers=headers)
    rt.flush()


def read_topic(cfg: PipelineConfig, topic: str, count: int, timeout_s: float = 60.0) -> list[Message]:
    """The first ``count`` messages of ``topic`` (all partitions); fails the test if they don't come."""
    consumer = make_consumer(cfg, "test", None, 10)
    assign_all(consumer, topic, OFFSET_BEGINNING)
    out: list[Message] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < count and time.monotonic() < deadline:
            out += [m for m in consumer.consume(1000, 0.2) if m.error() is None]
    finally:
        consumer.close()
    assert len(out) >= count, f"{topic}: {len(out)} of {count} messages after {timeout_s} s"
    return out


def read_all(cfg: PipelineConfig, topic: str) -> list[Message]:
    """Everything on ``topic`` now: read until three polls in a row bring nothing."""
    consumer = make_consumer(cfg, "test", None, 10)
    assign_all(consumer, topic, OFFSET_BEGINNING)
    out: list[Message] = []
    idle = 0
    try:
        while idle < 3:
            got = [m for m in consumer.consume(5000, 0.2) if m.error() is None]
            out, idle = out + got, 0 if got else idle + 1
    finally:
        consumer.close()
    return out


def read_codes_until(
    cfg: PipelineConfig, keys: set[bytes], source: str = "encoder", timeout_s: float = 60.0
) -> list[schemas.CodeMessage]:
    """Codes from the start of the codes topic until every key in ``keys`` has one from ``source``."""
    consumer = make_consumer(cfg, "test", None, 10)
    assign_all(consumer, cfg.topics.codes, OFFSET_BEGINNING)
    out: list[schemas.CodeMessage] = []
    missing = set(keys)
    deadline = time.monotonic() + timeout_s
    try:
        while missing and time.monotonic() < deadline:
            got = codes_of([m for m in consumer.consume(1000, 0.2) if m.error() is None])
            out += got
            missing -= {c.key for c in got if c.source == source}
    finally:
        consumer.close()
    assert not missing, f"{len(missing)} of {len(keys)} keys without a code from the {source} after {timeout_s} s"
    return out


def committed_total(cfg: PipelineConfig, group: str, topic: str) -> int:
    """The offsets ``group`` committed, summed over every partition of ``topic`` (what it read in all)."""
    consumer = make_consumer(cfg, "test", group, 100)
    try:
        parts = [TopicPartition(topic, p) for p in partitions_of(consumer, topic)]
        return sum(max(tp.offset, 0) for tp in consumer.committed(parts, timeout=30))
    finally:
        consumer.close()


def codes_of(msgs: Sequence[Message]) -> list[schemas.CodeMessage]:
    return [schemas.decode_code(m.value(), m.headers()) for m in msgs]


def wait_until(predicate: Callable[[], Any], timeout_s: float = 60.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


class RoleThread:
    """``with RoleThread(run_encoder, cfg) as role:`` runs a role in a thread and stops it cleanly after."""

    def __init__(self, target: Callable[..., None], cfg: PipelineConfig, **kwargs: Any) -> None:
        self.stop = threading.Event()
        self.metrics = fresh_metrics()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(target, cfg, kwargs), daemon=True)

    def _run(self, target: Callable[..., None], cfg: PipelineConfig, kwargs: dict[str, Any]) -> None:
        try:
            target(cfg, self.metrics, self.stop, **kwargs)
        except BaseException as exc:  # handed to the test: re-raised when the block ends
            self.error = exc

    def __enter__(self) -> RoleThread:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self._thread.join(60)
        assert not self._thread.is_alive(), "role did not stop within 60 s"
        if self.error is None:
            return
        if not isinstance(exc[1], BaseException):
            raise self.error
        exc[1].add_note(f"the role had stopped with {self.error!r}")

    def value(self, metric: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(metric, labels) or 0.0


def paired_items(ds_image: np.ndarray, ds_text: np.ndarray, rows: Sequence[int], chunk: int = 0) -> list[ItemRecord]:
    return [ItemRecord(int(r), ds_image[r], ds_text[r], None, chunk) for r in rows]


def keys_of(records) -> set[bytes]:
    return {schemas.code_key(r.item_id, m) for r in records for m in r.modalities}


def conflicting(codes: list[schemas.CodeMessage]) -> list[bytes]:
    """Keys that carry two different codes."""
    seen: dict[bytes, set[bytes]] = collections.defaultdict(set)
    for c in codes:
        seen[c.key].add(c.code.tobytes())
    return [key for key, distinct in seen.items() if len(distinct) > 1]


def serving(client: QueryClient) -> bool:
    try:
        return client.status(timeout_s=2).status == "ok"
    except TimeoutError:
        return False


class Replayer(threading.Thread):
    """Produces arrivals at ``rate`` items/s and remembers which ones the broker acknowledged; ``props``
    are producer properties on top of the replay's."""

    def __init__(self, cfg, records, rate: float, **props: Any) -> None:
        super().__init__(daemon=True)
        self.cfg = cfg
        self.records = records
        self.rate = rate
        self.acked: set[int] = set()
        self.failed = 0
        self.sent = 0
        self.producer = make_producer(cfg, "replay", **{"delivery.report.only.error": False, "acks": "all", **props})

    def _report(self, err, msg) -> None:
        if err is None:
            self.acked.add(int(msg.key()))
        else:
            self.failed += 1

    def run(self) -> None:
        start = time.monotonic()
        for i, record in enumerate(self.records):
            value, headers = schemas.encode_arrival(record)
            while True:
                try:
                    self.producer.produce(
                        self.cfg.topics.arrivals,
                        value,
                        str(record.item_id).encode(),
                        headers=headers,
                        on_delivery=self._report,
                    )
                    break
                except BufferError:
                    self.producer.poll(0.05)
            self.sent = i + 1
            self.producer.poll(0)
            time.sleep(max(0.0, start + (i + 1) / self.rate - time.monotonic()))
        self.producer.flush(120)


def wait_for_store(cfg: PipelineConfig, keys: int, timeout_s: float = 60.0) -> None:
    """Until the query tier's stores hold at least ``keys`` codes (every shard's status summed)."""
    with QueryClient(cfg) as client:
        wait_until(
            lambda: sum(client.status(timeout_s=5).store_codes) >= keys,
            timeout_s=timeout_s,
            what="the query store holding every acknowledged arrival's codes",
        )
