"""The encoder role: arrivals in, one database code per (item, modality) out.

It codes each batch with the model version it holds, records that version in every code, and picks
up newer versions from the models topic between batches without stopping. Every arrival passes the
arrival check first (:mod:`fpocmh_core.validation`); one that fails is dead-lettered, never coded.

Delivery (``delivery`` in the pipeline config): ``exactly_once`` codes each batch inside a Kafka
transaction with its input offsets, under a ``transactional.id`` that survives restarts, so a crash
anywhere in a batch leaves every key with one committed code even when the model version changed in
between; ``at_least_once`` commits the input offsets after the codes are acknowledged (see
:mod:`consumers.runtime`). ``auto`` takes exactly-once where the broker has transactions (Apache
Kafka) and at-least-once where it has not (the embedded tansu broker); there, the version each range
of offsets is coded with is recorded before the codes (:mod:`consumers.encoder.intents`), so a batch read again
after a crash gets the same codes. More copies in the same group share the arrivals' partitions.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from confluent_kafka import Consumer, Message, TopicPartition

from consumers.encoder.intents import IntentLog
from consumers.handlers import Decoded
from consumers.kafka import exactly_once, make_consumer
from consumers.metrics import Metrics
from consumers.models import ModelFollower, ModelVersion
from consumers.runtime import RoleStopped, Runtime
from consumers.settings import PipelineConfig
from fpocmh_core import schemas
from fpocmh_core.nets import HashModel
from fpocmh_core.records import ItemRecord, Modality

log = logging.getLogger(__name__)
# Copies of one encoder group on one host that get a transactional id of their own by default.
MAX_SLOTS = 64


def encode_records(model: HashModel, records: list[ItemRecord], version: int) -> list[tuple[bytes, bytes]]:
    """(key, body) of the code of every modality each record carries: one forward pass per modality for the
    batch, the code records built in one pass (a per-code :class:`~fpocmh_core.schemas.CodeMessage` costs as
    much as the network's share of the item)."""
    out: list[tuple[bytes, bytes]] = []
    for modality in _BOTH:
        rows = [r for r in records if r.features(modality) is not None]
        if not rows:
            continue
        feats = np.stack([r.features(modality) for r in rows])
        packed = model.encode(feats.astype(np.float32, copy=False), modality)
        ids = [r.item_id for r in rows]
        present = [_BOTH_MASK if r.image is not None and r.text is not None else 1 << modality for r in rows]
        bodies = schemas.encode_code_rows(ids, modality, present, packed, version)
        out += zip(schemas.code_keys(ids, modality), bodies, strict=True)
    return out


_BOTH = (Modality.IMAGE, Modality.TEXT)
_BOTH_MASK = schemas.modality_mask(_BOTH)


class Encoder:
    """The encoder's :class:`~consumers.handlers.Handler`."""

    def __init__(
        self, rt: Runtime, models: ModelFollower, first: ModelVersion, intents: IntentLog | None = None
    ) -> None:
        self.rt = rt
        self.models = models
        self.intents = intents
        self.codes_topic = rt.cfg.topics.codes
        self._use(first)

    def _use(self, ready: ModelVersion) -> None:
        self.model = ready.model
        self.check = ready.arrivals
        self.version = ready.version
        if self.model.bits != self.rt.cfg.bits:
            log.warning("model has %d bits, the pipeline config says %d", self.model.bits, self.rt.cfg.bits)

    def on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """A partition that changed hands may hold a batch its last owner coded but did not commit."""
        if self.intents is not None:
            self.intents.refresh()
        consumer.assign(partitions)

    def idle(self) -> None:
        ready = self.models.take()
        if ready is not None:
            self._use(ready)

    def decode(self, msg: Message) -> ItemRecord:
        return self.check.check(schemas.decode_arrival(msg.value(), msg.headers()))

    def process(self, batch: list[Decoded]) -> None:
        self.prepare(batch)()

    def prepare(self, batch: list[Decoded]) -> Callable[[], None]:
        """The codes of the batch; the returned call records new coding ranges (at least once) and produces them."""
        plan, fresh = self._plan(batch) if self.intents is not None else ({self.version: [d.value for d in batch]}, [])
        coded = [code for version, records in plan.items() for code in self._encode(version, records)]

        def emit() -> None:
            if fresh:
                assert self.intents is not None
                # Only offsets the coordinator confirmed are never read again: ranges below them can go.
                self.intents.record(fresh, committed=self.rt.committed)
            self.rt.produce_keyed(self.codes_topic, coded, schemas.CODE_HEADERS)

        return emit

    def _encode(self, version: int, records: list[ItemRecord]) -> list[tuple[bytes, bytes]]:
        model = self.model if version == self.version else self.models.recent(version).model
        return encode_records(model, records, version)

    def _plan(
        self, batch: list[Decoded]
    ) -> tuple[dict[int, list[ItemRecord]], list[tuple[tuple[str, int], schemas.CodingRange]]]:
        """At least once: each arrival's version (the one recorded for its offset, else the current one),
        and the new ranges to record before any code is produced."""
        assert self.intents is not None
        plan: dict[int, list[ItemRecord]] = {}
        fresh: dict[tuple[str, int], list[int]] = {}
        by_partition: dict[tuple[str, int], list[Decoded]] = {}
        for d in batch:
            by_partition.setdefault((d.msg.topic(), d.msg.partition()), []).append(d)
        for part, arrivals in by_partition.items():
            first = arrivals[0].msg.offset()
            if all(r.stop <= first for r in self.intents.ranges.get(part, ())):
                # The usual case: nothing recorded at or past this batch's offsets of the partition.
                fresh[part] = [first, arrivals[-1].msg.offset()]
                plan.setdefault(self.version, []).extend(d.value for d in arrivals)
                continue
            for d in arrivals:
                offset = d.msg.offset()
                version = self.intents.version_at(part, offset)
                if version is not None and version != self.version and self.models.recent(version) is None:
                    log.warning("encoder: version %d recorded for %s@%d is no longer at hand", version, part, offset)
                    version = None
                if version is None:
                    fresh.setdefault(part, []).append(offset)
                    version = self.version
                plan.setdefault(version, []).append(d.value)
        return plan, [(p, schemas.CodingRange(min(o), max(o) + 1, self.version)) for p, o in fresh.items()]


def run_encoder(cfg: PipelineConfig, metrics: Metrics, stop: threading.Event | None = None) -> None:
    """Wait for a model on the models topic, then code arrivals until ``stop`` is set."""
    torch.set_num_threads(cfg.encoder.threads)
    with contextlib.ExitStack() as held:
        txn_id = held.enter_context(transactional_id(cfg)) if exactly_once(cfg) else None
        _run(cfg, metrics, stop, txn_id)


def _run(cfg: PipelineConfig, metrics: Metrics, stop: threading.Event | None, txn_id: str | None) -> None:
    rt = Runtime(cfg, "encoder", metrics, stop, transactional_id=txn_id)
    log.info("encoder: delivery %s", f"exactly once (transactional.id {txn_id})" if txn_id else "at least once")
    models = ModelFollower(rt)
    try:
        first = models.wait_first(rt.stop)
        if first is None:
            return
        intents = None if txn_id else IntentLog(Runtime(cfg, "encoder", metrics, rt.stop), cfg.encoder.group)
        encoder = Encoder(rt, models, first, intents)
        # No static membership (group.instance.id): after a broker restart librdkafka rejoins under a new member
        # id, and the broker then fences the old one, which is fatal for the consumer.
        consumer = make_consumer(
            cfg, "encoder", cfg.encoder.group, cfg.encoder.fetch_wait_max_ms, on_commit=rt.on_commit
        )
        consumer.subscribe([cfg.topics.arrivals], on_assign=encoder.on_assign)
        log.info("encoder: model version %d; consuming %s", first.version, cfg.topics.arrivals)
        rt.run(consumer, encoder, cfg.encoder.batch_size, cfg.encoder.poll_timeout_s, fill_batches=True)
    finally:
        models.close()
        if not rt.transactional:
            rt.producer.flush(cfg.flush_timeout_s)


@contextlib.contextmanager
def transactional_id(cfg: PipelineConfig) -> Iterator[str]:
    """``encoder.transactional_id``, else ``<group>-<hostname>-<slot>`` with the lowest slot no running encoder
    of the group holds on this host (a file lock, released when the encoder stops or dies). So the id is
    unique among the copies running on a host and stable across restarts: a restarted encoder aborts what its
    previous incarnation left open at once instead of blocking readers until the transaction times out."""
    if cfg.encoder.transactional_id:
        yield cfg.encoder.transactional_id
        return
    folder = Path(tempfile.gettempdir())
    for slot in range(MAX_SLOTS):
        handle = (folder / f"fpocmh-{cfg.encoder.group}-encoder-{slot}.lock").open("a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        try:
            yield f"{cfg.encoder.group}-{socket.gethostname()}-{slot}"
        finally:
            handle.close()
        return
    raise RoleStopped(f"encoder: {MAX_SLOTS} encoders of {cfg.encoder.group} already run on this host")
