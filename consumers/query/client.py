"""The query tier's client: sends requests, gathers every shard's answer and merges them.

Every shard of the tier answers every request (see :mod:`consumers.query.shards`); an answer tells its
shard number and the shard count ``S``, so the client needs no shard configuration: it waits until it
holds ``S`` answers for a correlation id (one untagged answer when a single store serves everything)
and merges them by (distance, item id). A shard that does not answer in time makes the client raise,
or return the others' merged answer with status ``partial`` (``query.missing_shards``).

Consistency per request: ``eventual`` (no bound: whatever the stores hold), ``session`` (the offsets
a caller's own codes reached, collected in a :class:`SessionOffsets`), ``strong`` (the codes topic's
high watermarks when the request is sent). A shard behind the bound waits up to ``query.max_wait_s``
to apply it, then answers ``behind``; every answer reports the offsets it reflects.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from confluent_kafka import Consumer, KafkaError, Message, TopicPartition

from consumers.kafka import make_consumer, make_producer, partitions_of, query_fetch_wait_ms, reader_isolation
from consumers.metrics import Metrics
from consumers.offsets import poll_batch
from consumers.query.shards import ShardAnswers
from consumers.settings import PipelineConfig
from fpocmh_core import schemas
from fpocmh_core.records import Modality

log = logging.getLogger(__name__)

CONSISTENCY_LEVELS = ("eventual", "session", "strong")
# Shards answering on different model versions hash the query differently: ask again this often.
MODEL_MISMATCH_RETRIES = 3
# tansu 0.6.0 sometimes stops serving fetches that start at one offset of a partition, though the
# record is there. Concurrent appends to one partition set it off (scripts/tansu_append_stall.py: four
# producers appending one record each per round to one partition stopped after 441-1,390 rounds in
# eight runs, never to resume in the four that waited; on a partition each, 3,000-4,000 rounds ran).
# So shard s answers on a partition of its own (ShardSpec.reply_partition), and after this long without
# a message while answers are due the client starts a new consumer REWIND records back (answers are
# matched by id, so re-reading is harmless), for clients whose shards still share a partition.
STALL_S = 0.5
REWIND = 100


class QueryError(RuntimeError):
    """The query tier answered with an error status."""


@dataclass(frozen=True)
class Query:
    features: np.ndarray  # (dim,) or (n, dim)
    modality: Modality
    k: int = 100
    target: Modality | None = None  # default: the other modality


class SessionOffsets:
    """The codes-topic offsets a caller's writes reached: the bound of a ``session`` read.

    Pass :meth:`on_delivery` as the ``on_delivery`` callback of whatever produces the codes (or call
    :meth:`record` with offsets learnt elsewhere); a session query then sees at least those codes.
    """

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.next: dict[int, int] = {}

    def record(self, partition: int, offset: int) -> None:
        self.next[partition] = max(self.next.get(partition, 0), offset + 1)

    def on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is None and msg.topic() == self.topic:
            self.record(msg.partition(), msg.offset())

    def bound(self) -> schemas.Offsets:
        return tuple(sorted(self.next.items()))


class QueryClient:
    """Sends retrieval requests and waits for their answers (matched by correlation id).

    Shard s answers on partition ``reply_partition + s`` of the results topic (modulo its partition
    count); the client reads every partition from its current end. On tansu the end it reports can be
    a little early, which only means a few older answers are skipped by id.
    """

    def __init__(
        self,
        cfg: PipelineConfig,
        reply_partition: int | None = None,
        metrics: Metrics | None = None,
        stop: threading.Event | None = None,
        missing_shards: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.stop = stop
        self.missing_shards = missing_shards or cfg.query.missing_shards
        if self.missing_shards not in ("error", "partial"):
            raise ValueError(f"missing_shards must be error or partial, not {self.missing_shards!r}")
        self._sent: dict[str, tuple[float, Query | None, schemas.Offsets, int]] = {}
        self.producer = make_producer(cfg, "query-client", **{"linger.ms": 0})
        self._fetch_wait_ms = query_fetch_wait_ms(cfg)
        self.consumer = self._answers_consumer()
        # Shard s of S answers on partition reply_partition + s (mod the count): read them all, from their ends.
        self._at = self._ends(cfg.topics.results)
        self.reply_partition = random.choice(self._at).partition if reply_partition is None else reply_partition
        self.consumer.assign(self._at)
        self._answers: dict[str, ShardAnswers] = {}
        self._heard_at = time.monotonic()

    def _ends(self, topic: str) -> list[TopicPartition]:
        """Every partition of ``topic`` at its high watermark now (ListOffsets)."""
        ends = []
        for p in partitions_of(self.consumer, topic):
            _low, high = self.consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            ends.append(TopicPartition(topic, p, max(high, 0)))
        return ends

    def _answers_consumer(self) -> Consumer:
        return make_consumer(
            self.cfg, "query-client", None, self._fetch_wait_ms, **{"isolation.level": reader_isolation(self.cfg)}
        )

    # ------------------------------------------------------------------------------------- bounds

    def strong_bound(self) -> schemas.Offsets:
        """The codes topic's high watermarks now (ListOffsets). Exact on Apache Kafka; tansu reports
        the start of the newest record batch + 1, so there a strong read may miss that batch's tail."""
        return tuple((tp.partition, tp.offset) for tp in self._ends(self.cfg.topics.codes))

    def bound(self, consistency: str, session: SessionOffsets | None = None) -> schemas.Offsets:
        if consistency == "eventual":
            return ()
        if consistency == "session":
            if session is None:
                raise ValueError("session consistency needs the session's offsets (a SessionOffsets)")
            return session.bound()
        if consistency == "strong":
            return self.strong_bound()
        raise ValueError(f"consistency {consistency!r}: expected one of {', '.join(CONSISTENCY_LEVELS)}")

    # ------------------------------------------------------------------------------------- requests

    def send(self, query: Query, bound: schemas.Offsets = (), attempt: int = 0) -> str:
        """Produce one request (not waited for); returns its correlation id."""
        correlation_id = uuid.uuid4().hex
        features = np.asarray(query.features)
        req = schemas.QueryRequest(
            correlation_id=correlation_id,
            reply_topic=self.cfg.topics.results,
            modality=query.modality,
            features=features[None, :] if features.ndim == 1 else features,
            k=query.k,
            target=query.modality.other if query.target is None else query.target,
            reply_partition=self.reply_partition,
            min_offsets=bound,
            wait_ms=int(1000 * self.cfg.query.max_wait_s) if bound else 0,
        )
        body, headers = schemas.encode_query(req)
        self.producer.produce(self.cfg.topics.queries, body, key=correlation_id.encode(), headers=headers)
        self.producer.poll(0)
        self._sent[correlation_id] = (time.perf_counter(), query, bound, attempt)
        return correlation_id

    def _receive(self, timeout_s: float) -> None:
        msgs = poll_batch(self.consumer, 1000, timeout_s)
        if msgs:
            self._heard_at = time.monotonic()
        elif time.monotonic() - self._heard_at > STALL_S:
            self._restart_fetch()
        for msg in msgs:
            if msg.error() is not None:
                continue
            try:
                result = schemas.decode_result(msg.value(), msg.headers())
            except schemas.SchemaError as exc:
                log.warning("query client: unreadable answer at offset %d: %s", msg.offset(), exc)
                continue
            if result.correlation_id in self._sent:
                self._answers.setdefault(result.correlation_id, ShardAnswers()).add(result)

    def _restart_fetch(self) -> None:
        self._at = [
            TopicPartition(at.topic, at.partition, max(0, at.offset - REWIND) if at.offset >= 0 else was.offset)
            for at, was in zip(self.consumer.position(self._at), self._at, strict=True)
        ]
        self.consumer.close()
        self.consumer = self._answers_consumer()
        self.consumer.assign(self._at)
        self._heard_at = time.monotonic()

    def _finish(self, cid: str, answers: ShardAnswers) -> schemas.QueryResult:
        sent, query, _bound, _attempt = self._sent.pop(cid)
        self._answers.pop(cid, None)
        result = answers.merged(query.k if query is not None else 0)
        if self.metrics is not None:
            self.metrics.query_duration.labels("replay").observe(time.perf_counter() - sent)
            self.metrics.query_answers.labels("replay", result.status).inc()
        return result

    def collect(self, correlation_ids: Sequence[str], timeout_s: float | None = None) -> list[schemas.QueryResult]:
        """The merged answers to ``correlation_ids``, in that order.

        Raises TimeoutError if an answer is missing in time (with ``missing_shards: partial``, only if
        no shard answered), InterruptedError once the client's stop flag is set.
        """
        timeout_s = self.cfg.query.client_timeout_s if timeout_s is None else timeout_s
        self.producer.flush(timeout_s)
        current = {cid: cid for cid in correlation_ids}  # asked -> the request now answering it
        done: dict[str, schemas.QueryResult] = {}
        deadline = time.monotonic() + timeout_s
        while len(done) < len(current):
            if self.stop is not None and self.stop.is_set():
                raise InterruptedError("stopped while waiting for answers")
            left = deadline - time.monotonic()
            if left <= 0:
                return self._give_up(current, done, timeout_s)
            self._receive(min(left, 0.1))
            for asked, cid in current.items():
                answers = self._answers.get(cid)
                if asked in done or answers is None or not answers.complete:
                    continue
                _sent, query, bound, attempt = self._sent[cid]
                if len(answers.model_versions) > 1 and attempt < MODEL_MISMATCH_RETRIES and query is not None:
                    # A shard hashed the query with another model version: ask everyone again.
                    self._sent.pop(cid)
                    self._answers.pop(cid)
                    current[asked] = self.send(query, bound, attempt + 1)
                    self.producer.flush(left)
                    continue
                done[asked] = self._finish(cid, answers)
        return [done[cid] for cid in correlation_ids]

    def _give_up(
        self, current: dict[str, str], done: dict[str, schemas.QueryResult], timeout_s: float
    ) -> list[schemas.QueryResult]:
        pending = [asked for asked in current if asked not in done]
        heard = {asked: self._answers.get(current[asked]) for asked in pending}
        if self.missing_shards == "partial" and all(heard.values()):
            for asked in pending:
                done[asked] = self._finish(current[asked], heard[asked])  # type: ignore[arg-type]
            return [done[cid] for cid in current]
        for asked in pending:
            self._sent.pop(current[asked], None)
            self._answers.pop(current[asked], None)
        silent = [a.missing for a in heard.values() if a is not None]
        detail = f"; shard(s) {sorted({s for m in silent for s in m})} silent" if silent else ""
        raise TimeoutError(f"{len(pending)} of {len(current)} answers missing after {timeout_s:.1f} s{detail}")

    def search(
        self,
        query: Query,
        timeout_s: float | None = None,
        consistency: str = "eventual",
        session: SessionOffsets | None = None,
    ) -> schemas.QueryResult:
        """One round trip; raises :class:`QueryError` unless the answer is ok (or partial, when the
        client accepts partial answers)."""
        (result,) = self.collect([self.send(query, self.bound(consistency, session))], timeout_s)
        if result.status not in ("ok", "partial"):
            raise QueryError(f"query answered {result.status}: {result.error}")
        return result

    def search_many(
        self,
        queries: Sequence[Query],
        timeout_s: float | None = None,
        consistency: str = "eventual",
        session: SessionOffsets | None = None,
    ) -> list[schemas.QueryResult]:
        """All requests first, then all answers: many queries in flight at once."""
        bound = self.bound(consistency, session)
        return self.collect([self.send(q, bound) for q in queries], timeout_s)

    def status(self, timeout_s: float | None = None) -> schemas.QueryResult:
        """An empty request: the answer tells the model version and the store size over every shard."""
        empty = np.zeros((0, 0), np.float32)
        return self.collect([self.send(Query(empty, Modality.IMAGE, 0))], timeout_s)[0]

    def close(self) -> None:
        self.producer.flush(5)
        self.consumer.close()

    def __enter__(self) -> QueryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
