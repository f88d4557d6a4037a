"""The query role and its client.

The role materialises the codes topic into one faiss binary index per modality (every copy holds the
whole store: a replicated store; see docs/scaling.md for the partitioned one), reads it to the end
before it joins the request group, then keeps up between request batches. A request names the query
modality, its features (one row per query), k and the target modality (the other one by default:
cross-modal retrieval); the answer holds ranked item ids and Hamming distances. The role's single
thread owns the index, so searches never see it mid-update.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import faiss
import numpy as np
import torch
from confluent_kafka import Message, TopicPartition

from consumers.kafka import make_consumer, make_producer, partitions_of
from consumers.metrics import Metrics
from consumers.models import ModelFollower, ModelVersion
from consumers.runtime import Decoded, Runtime, TopicReader, poll_batch
from consumers.settings import PipelineConfig
from fpocmh_core import schemas
from fpocmh_core.records import Modality

log = logging.getLogger(__name__)

HEAP_MAX_K = 256
# Worst case per ranked item in an answer: an int64 id and an 8-bit distance.
ANSWER_BYTES_PER_HIT = 9


class CodeStore:
    """Database codes by (item, modality), searchable by Hamming distance.

    The newest record of a key replaces the older one, as compaction would: a key written twice (a
    batch re-read after a crash) is held once.
    """

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self._index = {m: faiss.IndexBinaryIDMap2(faiss.IndexBinaryFlat(bits)) for m in Modality}
        self._ids: dict[Modality, set[int]] = {m: set() for m in Modality}

    def upsert(self, codes: Sequence[schemas.CodeMessage]) -> None:
        latest = {(c.modality, c.item_id): c for c in codes}
        for modality in Modality:
            rows = [c for (m, _), c in latest.items() if m is modality]
            if not rows:
                continue
            ids = np.fromiter((c.item_id for c in rows), np.int64, len(rows))
            known = self._ids[modality]
            again = [i for i in ids.tolist() if i in known]
            if again:
                self._index[modality].remove_ids(np.array(again, dtype=np.int64))
            self._index[modality].add_with_ids(np.stack([c.code for c in rows]), ids)
            known.update(ids.tolist())

    def search(self, q_packed: np.ndarray, target: Modality, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances, item ids), nearest first, (n, min(k, stored)) each."""
        index = self._index[target]
        k = min(k, index.ntotal)
        if k == 0:
            n = q_packed.shape[0]
            return np.zeros((n, 0), np.int32), np.zeros((n, 0), np.int64)
        # A heap is fastest for a short top-k; counting selection for long ones (3x at k = 1000).
        faiss.downcast_IndexBinary(index.index).use_heap = k <= HEAP_MAX_K
        return index.search(np.ascontiguousarray(q_packed, dtype=np.uint8), k)

    def count(self, modality: Modality) -> int:
        return self._index[modality].ntotal

    @property
    def counts(self) -> tuple[int, int]:
        return self.count(Modality.IMAGE), self.count(Modality.TEXT)

    def codes(self, modality: Modality) -> tuple[np.ndarray, np.ndarray]:
        """(item ids, packed codes) of every stored code of ``modality``, for in-process comparisons."""
        index = self._index[modality]
        ids = faiss.vector_to_array(index.id_map).astype(np.int64)
        packed = faiss.vector_to_array(faiss.downcast_IndexBinary(index.index).xb).reshape(-1, self.bits // 8)
        return ids, packed


class QueryService:
    """The query role's :class:`~consumers.runtime.Handler`: keeps the store current and answers."""

    def __init__(self, rt: Runtime, models: ModelFollower, codes: TopicReader, first: ModelVersion) -> None:
        self.rt = rt
        self.models = models
        self.codes = codes
        self.store = CodeStore(rt.cfg.bits)
        self._reply_partitions: dict[str, int] = {}
        self._use(first)

    def _use(self, ready: ModelVersion) -> None:
        self.model = ready.model
        self.version = ready.version

    def catch_up(self, stop: threading.Event) -> bool:
        """Read the codes topic to where it ended at start-up; False if stopped first."""
        while not stop.is_set():
            self.read_codes(self.rt.cfg.query.codes_batch_size, 0.1)
            if self.codes.caught_up():
                return True
        return False

    def read_codes(self, max_messages: int, timeout_s: float) -> int:
        batch = self.codes.poll(max_messages, timeout_s)
        if batch:
            self.store.upsert([d.value for d in batch])
            for m in Modality:
                self.rt.metrics.store_codes.labels(m.short).set(self.store.count(m))
        return len(batch)

    def idle(self) -> None:
        ready = self.models.take()
        if ready is not None:
            self._use(ready)
        self.read_codes(self.rt.cfg.query.codes_batch_size, 0.0)
        self.rt.update_lag(self.codes.consumer)

    def decode(self, msg: Message) -> schemas.QueryRequest:
        req = schemas.decode_query(msg.value(), msg.headers())
        self._check_reply_target(req)
        return req

    def _check_reply_target(self, req: schemas.QueryRequest) -> None:
        """A reply that can't be delivered would fail the whole batch, so such a request is a dead letter."""
        partitions = self._reply_partitions.get(req.reply_topic)
        if partitions is None or req.reply_partition >= partitions:
            # All topics, not this one: asking for one topic by name can auto-create it.
            meta = self.rt.producer.list_topics(timeout=5).topics
            self._reply_partitions = {name: len(t.partitions) for name, t in meta.items() if t.error is None}
            partitions = self._reply_partitions.get(req.reply_topic)
        if partitions is None:
            raise schemas.SchemaError("decode", f"query {req.correlation_id}: reply topic {req.reply_topic!r} missing")
        if req.reply_partition >= partitions:
            raise schemas.SchemaError(
                "decode", f"query {req.correlation_id}: reply partition {req.reply_partition} of {partitions}"
            )

    def process(self, batch: list[Decoded]) -> None:
        oldest_ms = 1000 * (time.time() - self.rt.cfg.query.max_request_age_s)
        for item in batch:
            start = time.perf_counter()
            req: schemas.QueryRequest = item.value
            if item.msg.timestamp()[1] < oldest_ms:
                continue
            result = self.answer(req)
            if result.status == "bad_request":
                self.rt.dead_letter(item.msg, "shape", result.error)
            body, headers = schemas.encode_result(result)
            self.rt.produce(
                req.reply_topic, body, key=req.correlation_id.encode(), headers=headers, partition=req.reply_partition
            )
            self.rt.metrics.query_duration.labels("query").observe(time.perf_counter() - start)

    def answer(self, req: schemas.QueryRequest) -> schemas.QueryResult:
        n = req.features.shape[0]
        empty = np.zeros((n, 0), np.int64)
        if n:
            want = self.model.net(req.modality).in_dim
            if req.features.shape[1] != want:
                error = f"{req.modality.short} features have {req.features.shape[1]} dims; the model takes {want}"
                return self._result(req, "bad_request", empty, empty, 0.0, error)
            k = min(req.k, self.store.count(req.target))
            if n * k * ANSWER_BYTES_PER_HIT > self.rt.cfg.message_max_bytes - 16384:
                error = f"{n} queries x top-{k} would not fit in one message; send fewer rows or a smaller k"
                return self._result(req, "bad_request", empty, empty, 0.0, error)
        start = time.perf_counter()
        packed = self.model.encode(np.asarray(req.features, dtype=np.float32), req.modality)
        dist, ids = self.store.search(packed, req.target, req.k) if n else (empty, empty)
        return self._result(req, "ok", ids, dist, time.perf_counter() - start)

    def _result(
        self, req: schemas.QueryRequest, status: str, ids: np.ndarray, dist: np.ndarray, seconds: float, error: str = ""
    ) -> schemas.QueryResult:
        return schemas.QueryResult(
            req.correlation_id, status, ids, dist, self.version, self.store.counts, seconds, error
        )


def run_query(cfg: PipelineConfig, metrics: Metrics, stop: threading.Event | None = None) -> None:
    """Wait for a model, read the codes topic to its end, then answer requests until ``stop`` is set."""
    torch.set_num_threads(cfg.query.threads)
    # One thread per search: OpenMP workers spinning on a shared, busy machine cost 100x in latency.
    faiss.omp_set_num_threads(cfg.query.threads)
    rt = Runtime(cfg, "query", metrics, stop, {"linger.ms": 0})
    models = ModelFollower(rt)

    def decode_code(msg: Message) -> schemas.CodeMessage:
        code = schemas.decode_code(msg.value(), msg.headers())
        if code.bits != cfg.bits:
            raise schemas.SchemaError("shape", f"code of {code.bits} bits in a {cfg.bits}-bit store")
        return code

    codes = TopicReader(rt, cfg.topics.codes, decode_code, cfg.query.fetch_wait_max_ms)
    try:
        first = models.wait_first(rt.stop)
        if first is None:
            return
        service = QueryService(rt, models, codes, first)
        start = time.monotonic()
        if not service.catch_up(rt.stop):
            return
        rt.flush()  # dead letters from the catch-up
        metrics.store_ready.set(1)
        log.info(
            "query: store ready with %d image and %d text codes after %.1f s; model version %d",
            *service.store.counts,
            time.monotonic() - start,
            service.version,
        )
        consumer = make_consumer(cfg, "query", cfg.query.group, cfg.query.fetch_wait_max_ms)
        consumer.subscribe([cfg.topics.queries])
        rt.run(consumer, service, cfg.query.batch_size, cfg.query.poll_timeout_s)
    finally:
        metrics.store_ready.set(0)
        codes.close()
        models.close()
        rt.producer.flush(cfg.flush_timeout_s)


class QueryError(RuntimeError):
    """The query role answered with an error status."""


@dataclass(frozen=True)
class Query:
    features: np.ndarray  # (dim,) or (n, dim)
    modality: Modality
    k: int = 100
    target: Modality | None = None  # default: the other modality


class QueryClient:
    """Sends retrieval requests and waits for their answers (matched by correlation id).

    Answers come back on one partition of the results topic, read from its current end; on tansu the
    end it reports can be a little early, which only means a few older answers are skipped by id.
    """

    def __init__(
        self,
        cfg: PipelineConfig,
        reply_partition: int | None = None,
        metrics: Metrics | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.stop = stop
        self._sent: dict[str, float] = {}
        self.producer = make_producer(cfg, "query-client", **{"linger.ms": 0})
        self.consumer = make_consumer(cfg, "query-client", None, cfg.query.fetch_wait_max_ms)
        topic = cfg.topics.results
        self.reply_partition = (
            random.choice(partitions_of(self.consumer, topic)) if reply_partition is None else reply_partition
        )
        tp = TopicPartition(topic, self.reply_partition)
        _low, high = self.consumer.get_watermark_offsets(tp, timeout=10)
        self.consumer.assign([TopicPartition(topic, self.reply_partition, max(high, 0))])
        self._answers: dict[str, schemas.QueryResult] = {}

    def send(self, query: Query) -> str:
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
        )
        body, headers = schemas.encode_query(req)
        self.producer.produce(self.cfg.topics.queries, body, key=correlation_id.encode(), headers=headers)
        self.producer.poll(0)
        self._sent[correlation_id] = time.perf_counter()
        return correlation_id

    def collect(self, correlation_ids: Sequence[str], timeout_s: float | None = None) -> list[schemas.QueryResult]:
        """The answers to ``correlation_ids``, in that order.

        Raises TimeoutError if any is missing in time, InterruptedError once the client's stop flag is set.
        """
        timeout_s = self.cfg.query.client_timeout_s if timeout_s is None else timeout_s
        self.producer.flush(timeout_s)
        wanted = set(correlation_ids)
        deadline = time.monotonic() + timeout_s
        while wanted - self._answers.keys():
            if self.stop is not None and self.stop.is_set():
                raise InterruptedError("stopped while waiting for answers")
            left = deadline - time.monotonic()
            if left <= 0:
                for cid in correlation_ids:
                    self._sent.pop(cid, None)
                missing = len(wanted - self._answers.keys())
                raise TimeoutError(f"{missing} of {len(wanted)} answers missing after {timeout_s:.1f} s")
            for msg in poll_batch(self.consumer, 1000, min(left, 0.1)):
                if msg.error() is not None:
                    continue
                try:
                    result = schemas.decode_result(msg.value(), msg.headers())
                except schemas.SchemaError as exc:
                    log.warning("query client: unreadable answer at offset %d: %s", msg.offset(), exc)
                    continue
                if result.correlation_id in wanted:
                    self._answers[result.correlation_id] = result
                    sent = self._sent.pop(result.correlation_id, None)
                    if self.metrics is not None and sent is not None:
                        self.metrics.query_duration.labels("replay").observe(time.perf_counter() - sent)
        return [self._answers.pop(cid) for cid in correlation_ids]

    def search(self, query: Query, timeout_s: float | None = None) -> schemas.QueryResult:
        """One round trip; raises :class:`QueryError` unless the answer's status is ok."""
        (result,) = self.collect([self.send(query)], timeout_s)
        if result.status != "ok":
            raise QueryError(f"query answered {result.status}: {result.error}")
        return result

    def search_many(self, queries: Sequence[Query], timeout_s: float | None = None) -> list[schemas.QueryResult]:
        """All requests first, then all answers: many queries in flight at once."""
        return self.collect([self.send(q) for q in queries], timeout_s)

    def status(self, timeout_s: float | None = None) -> schemas.QueryResult:
        """An empty request: the answer tells the serving copy's model version and store size."""
        empty = np.zeros((0, 0), np.float32)
        return self.collect([self.send(Query(empty, Modality.IMAGE, 0))], timeout_s)[0]

    def close(self) -> None:
        self.producer.flush(5)
        self.consumer.close()

    def __enter__(self) -> QueryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
