"""The query role: one shard of the code store, answering retrieval requests.

A shard owns some partitions of the codes topic (all of them when it is the only one, see
:mod:`consumers.query.shards`), starts from its newest valid snapshot (:mod:`consumers.query.snapshots`), reads
its partitions to their end (:mod:`consumers.query.code_log`) and only then joins its group on the queries
topic, then keeps up between request batches. A request names the query modality, its features (one
row per query), k, the target modality (the other one by default: cross-modal retrieval) and
optionally a consistency bound (minimum next offsets per codes partition); the answer holds the
shard's ranked item ids and Hamming distances in (distance, id) order, tagged with the shard and the
offsets its store reflects. The role's single thread owns the store, so searches never see it
mid-update. The client lives in :mod:`consumers.query.client`.
"""

from __future__ import annotations

import logging
import threading
import time

import faiss
import numpy as np
import torch
from confluent_kafka import Message

from consumers.handlers import Decoded
from consumers.kafka import make_consumer, partitions_of, query_fetch_wait_ms
from consumers.metrics import Metrics
from consumers.models import ModelFollower, ModelVersion
from consumers.query.client import Query, QueryClient, QueryError
from consumers.query.code_log import CodeLog, TopicReset
from consumers.query.shards import ShardSpec
from consumers.query.snapshots import SnapshotDir, shard_dir
from consumers.query.store import CodeStore, return_freed_arrays_to_os
from consumers.runtime import Runtime
from consumers.settings import PipelineConfig
from fpocmh_core import schemas
from fpocmh_core.hamming import SearchStats
from fpocmh_core.records import Modality
from fpocmh_core.validation import check_query_features

__all__ = ["CodeStore", "Query", "QueryClient", "QueryError", "QueryService", "run_query"]

log = logging.getLogger(__name__)

# Worst case per ranked item in an answer: an int64 id and an 8-bit distance.
ANSWER_BYTES_PER_HIT = 9
# How often a serving shard looks at the watermarks for a reset topic and at its snapshot schedule.
CHECK_EVERY_S = 1.0


class QueryService:
    """The query role's :class:`~consumers.handlers.Handler`: keeps the shard's store current and answers."""

    def __init__(
        self, rt: Runtime, models: ModelFollower, first: ModelVersion, shard: ShardSpec, partitions: list[int]
    ) -> None:
        cfg = rt.cfg
        self.rt = rt
        self.models = models
        self.shard = shard
        self.partitions = partitions
        self.store = CodeStore(cfg.bits, cfg.query.index)
        self.snapshots = (
            SnapshotDir(
                shard_dir(cfg.query.snapshot_dir, cfg.topics.codes, shard.index, shard.count),
                cfg.topics.codes,
                partitions,
                cfg.bits,
                cfg.query.keep_snapshots,
            )
            if cfg.query.snapshot_dir
            else None
        )
        snap = self.snapshots.load_newest(self.store) if self.snapshots is not None else None
        self.model_versions: set[int] = set(snap.model_versions) if snap else set()
        if snap is not None:
            log.info("query %s: loaded snapshot %s (%d image, %d text codes)", shard.tag, snap.path, *self.store.counts)
            self.rt.metrics.store_snapshot_time.labels(shard.tag).set(snap.created)
        self.rt.metrics.store_index_info.labels(shard.tag, cfg.query.index).set(1)
        self._count_codes()
        self.codes = CodeLog(rt, cfg.topics.codes, partitions, snap.offsets if snap else None)
        self._unsaved = 0
        self._saved_at = time.monotonic()
        self._checked_at = 0.0
        self._reply_partitions: dict[str, int] = {}
        self._use(first)

    def _use(self, ready: ModelVersion) -> None:
        self.model = ready.model
        self.version = ready.version

    # ------------------------------------------------------------------------------------- the store

    def catch_up(self, stop: threading.Event) -> bool:
        """Read the shard's partitions to where they ended when reading began; False if stopped first.
        A reset topic found on the way (a snapshot newer than the topic) starts the store over."""
        while not stop.is_set():
            self.read_codes(self.rt.cfg.query.codes_batch_size, 0.1)
            try:
                self.codes.check_reset()
            except TopicReset as exc:
                self._start_over(exc)
                continue
            if self.codes.caught_up():
                return True
        return False

    def _start_over(self, reason: TopicReset) -> None:
        log.warning("query %s: codes topic was reset (%s); rebuilding the store from the start", self.shard.tag, reason)
        self.rt.metrics.store_rebuilds.labels(self.shard.tag).inc()
        self.codes.close()
        self.store.clear()
        self.model_versions.clear()
        self.codes = CodeLog(self.rt, self.rt.cfg.topics.codes, self.partitions)
        self._unsaved = 1  # the old snapshots describe a topic that is gone: replace them soon

    def read_codes(self, max_messages: int, timeout_s: float) -> int:
        rows = self.codes.poll(max_messages, timeout_s)
        if rows.size:
            self.store.upsert_rows(rows)
            self.model_versions |= self.codes.model_versions
            self._unsaved += rows.size
            self._count_codes()
        return int(rows.size)

    def _count_codes(self) -> None:
        for m in Modality:
            self.rt.metrics.store_codes.labels(self.shard.tag, m.short).set(self.store.count(m))
            self.rt.metrics.store_index_table_bytes.labels(self.shard.tag, m.short).set(self.store.modal[m].table_bytes)

    def snapshot(self) -> None:
        if self.snapshots is None or not self._unsaved:
            return
        start = time.monotonic()
        path = self.snapshots.write(self.store, self.codes.next, self.model_versions)
        self._unsaved, self._saved_at = 0, time.monotonic()
        self.rt.metrics.store_snapshot_time.labels(self.shard.tag).set(time.time())
        log.info("query %s: snapshot %s written in %.2f s", self.shard.tag, path, time.monotonic() - start)

    def idle(self) -> None:
        ready = self.models.take()
        if ready is not None:
            self._use(ready)
        self.read_codes(self.rt.cfg.query.codes_batch_size, 0.0)
        self.rt.update_lag(self.codes.consumer)
        now = time.monotonic()
        if now - self._checked_at < CHECK_EVERY_S:
            return
        self._checked_at = now
        try:
            self.codes.check_reset()
        except TopicReset as exc:
            self._start_over(exc)
            self.catch_up(self.rt.stop)
        self.rt.metrics.store_offsets_behind.labels(self.shard.tag).set(self.codes.lag())
        q = self.rt.cfg.query
        due = self._unsaved >= q.snapshot_every_codes or (self._unsaved and now - self._saved_at >= q.snapshot_every_s)
        if due:
            self.snapshot()

    # ------------------------------------------------------------------------------------- requests

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
            refused = self.refusal(req)
            if refused is None:
                result = self.answer(req)
            else:
                reason, error = refused
                self.rt.dead_letter(item.msg, reason, error)
                empty = np.zeros((req.features.shape[0], 0), np.int64)
                result = self._result(req, "bad_request", empty, empty, 0.0, error)
            body, headers = schemas.encode_result(result)
            partition = self.shard.reply_partition(req.reply_partition, self._reply_partitions[req.reply_topic])
            key = req.correlation_id.encode()
            self.rt.produce(req.reply_topic, body, key=key, headers=headers, partition=partition)
            self.rt.metrics.query_answers.labels("query", result.status).inc()
            self.rt.metrics.query_duration.labels("query").observe(time.perf_counter() - start)

    def refusal(self, req: schemas.QueryRequest) -> tuple[str, str] | None:
        """(dead-letter reason, why) when ``req`` can't be answered by any store; such a query is never hashed."""
        n = req.features.shape[0]
        if not n:
            return None
        problem = check_query_features(req.features, self.model.net(req.modality).in_dim)
        if problem:
            return problem[0], f"{req.modality.short} {problem[1]}"
        if n * min(req.k, self.store.count(req.target)) * ANSWER_BYTES_PER_HIT > self.rt.cfg.message_max_bytes - 16384:
            return "shape", f"{n} queries x top-{req.k} would not fit in one message; send fewer rows or a smaller k"
        return None

    def wait_for(self, bound: dict[int, int], wait_s: float) -> dict[int, int]:
        """Read codes until the store reflects ``bound`` or ``wait_s`` passed; what is still missing."""
        deadline = time.monotonic() + wait_s
        missing = self.codes.behind(bound)
        while missing and time.monotonic() < deadline and not self.rt.stop.is_set():
            self.read_codes(self.rt.cfg.query.codes_batch_size, min(0.05, max(0.0, deadline - time.monotonic())))
            missing = self.codes.behind(bound)
        return missing

    def answer(self, req: schemas.QueryRequest) -> schemas.QueryResult:
        n = req.features.shape[0]
        empty = np.zeros((n, 0), np.int64)
        if req.min_offsets:
            missing = self.wait_for(dict(req.min_offsets), min(req.wait_ms / 1000, self.rt.cfg.query.max_wait_s))
            if missing:
                at = ", ".join(f"partition {p}: {self.codes.next[p]} < {o}" for p, o in sorted(missing.items()))
                return self._result(req, "behind", empty, empty, 0.0, f"store not up to the bound ({at})")
        if not n:
            return self._result(req, "ok", empty, empty, 0.0)
        start = time.perf_counter()
        packed = self.model.encode(np.asarray(req.features, dtype=np.float32), req.modality)
        hashed = time.perf_counter()
        dist, ids = self.store.search(packed, req.target, req.k)
        searched = time.perf_counter()
        self._observe_search(self.store.modal[req.target].last_stats, hashed - start, searched - hashed)
        return self._result(req, "ok", ids, dist, searched - start, hash_seconds=hashed - start)

    def _observe_search(self, stats: SearchStats, hash_s: float, index_s: float) -> None:
        """Why a query was slow: hashing or the index, the buckets it probed and the codes it compared."""
        self.rt.metrics.query_hash_duration.labels(self.shard.tag).observe(hash_s)
        self.rt.metrics.query_index_duration.labels(self.shard.tag).observe(index_s)
        probes = self.rt.metrics.query_index_probes.labels(self.shard.tag)
        candidates = self.rt.metrics.query_index_candidates.labels(self.shard.tag)
        for p, c in zip(stats.probes.tolist(), stats.candidates.tolist(), strict=True):
            probes.observe(p)
            candidates.observe(c)

    def _result(
        self,
        req: schemas.QueryRequest,
        status: str,
        ids: np.ndarray,
        dist: np.ndarray,
        seconds: float,
        error: str = "",
        hash_seconds: float = 0.0,
    ) -> schemas.QueryResult:
        return schemas.QueryResult(
            req.correlation_id,
            status,
            ids,
            dist,
            self.version,
            self.store.counts,
            seconds,
            error,
            self.shard.result_shard,
            self.shard.count,
            self.codes.offsets(),
            hash_seconds,
        )

    def close(self) -> None:
        self.codes.close()


def run_query(
    cfg: PipelineConfig, metrics: Metrics, stop: threading.Event | None = None, shard: ShardSpec | None = None
) -> None:
    """Wait for a model, load the shard's snapshot, read its codes partitions to their end, then answer
    requests until ``stop`` is set (and write a last snapshot)."""
    shard = shard or ShardSpec()
    return_freed_arrays_to_os()
    torch.set_num_threads(cfg.query.threads)
    # One thread per search: OpenMP workers spinning on a shared, busy machine cost 100x in latency.
    faiss.omp_set_num_threads(cfg.query.threads)
    rt = Runtime(cfg, "query", metrics, stop, {"linger.ms": 0})
    models = ModelFollower(rt)
    service = None
    try:
        first = models.wait_first(rt.stop)
        if first is None:
            return
        partitions = shard.owns(partitions_of(rt.producer, cfg.topics.codes))
        if not partitions:
            raise ValueError(f"query shard {shard.tag}: the codes topic has fewer than {shard.count} partitions")
        service = QueryService(rt, models, first, shard, partitions)
        start = time.monotonic()
        if not service.catch_up(rt.stop):
            return
        rt.flush()  # dead letters from the catch-up
        metrics.store_ready.set(1)
        log.info(
            "query %s: store ready with %d image and %d text codes of partitions %s after %.1f s; model version %d",
            shard.tag,
            *service.store.counts,
            partitions,
            time.monotonic() - start,
            service.version,
        )
        consumer = make_consumer(cfg, "query", shard.group(cfg.query.group), query_fetch_wait_ms(cfg))
        consumer.subscribe([cfg.topics.queries])
        rt.run(
            consumer,
            service,
            cfg.query.batch_size,
            cfg.query.poll_timeout_s,
            before_close=service.snapshot,
            commit_every_s=cfg.query.commit_every_s,
        )
    finally:
        metrics.store_ready.set(0)
        if service is not None:
            service.close()
        models.close()
        rt.producer.flush(cfg.flush_timeout_s)
