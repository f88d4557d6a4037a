"""The one poll loop every role runs, and what it needs: stop flag, producer, dead letters, commits, lag.

One batch goes: poll -> decode each message (unreadable ones go to the dead-letter topic with the
reason and their source topic/partition/offset) -> process -> flush the producer and wait for every
delivery report -> only then commit the batch's offsets. A crash anywhere before the commit means the
batch is read again (at-least-once); it never means a committed input whose output was lost. A
:class:`Pipelined` handler (the encoder) overlaps the wait: its next batch is decoded and computed while
the broker acknowledges the last one, which is committed before the next one produces anything.

With a ``transactional_id`` (delivery ``exactly_once``, on brokers with transactions) a batch's
outputs and its input offsets go in one Kafka transaction instead: a crash anywhere leaves either all of
it or none of it visible to ``read_committed`` readers, and a failed transaction is aborted and the
batch read again.

Faults stay in their message: an unreadable, invalid or oversized message goes to the dead-letter topic
(oversized ones as a bounded record: reason, origin, size, digest and a prefix, never the whole payload
the broker would refuse again); a batch whose processing raises is processed again one message at a
time, and the message that still raises is dead-lettered. Only broker and configuration failures stop
a role, with a one-line reason. While the broker is away the loop keeps its batch uncommitted and
waits (see :mod:`consumers.health`).

SIGTERM and the first Ctrl-C only set a flag: the loop finishes its batch, flushes, commits and closes
the consumer (leaving the group at once). A second Ctrl-C interrupts for real.

One module: the loop's three modes (at least once, overlapped, transactional) share the producer, the
pending batch, the commit path and the dead-letter route; split apart, each would reach into the others'
state. What is not the loop lives beside it (``handlers``, ``offsets``, ``topic_reader``, ``lifecycle``).
"""

from __future__ import annotations

import collections
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from consumers import faults, health
from consumers.handlers import Decoded, Handler, Pipelined
from consumers.kafka import make_admin, make_producer
from consumers.metrics import Metrics
from consumers.offsets import IntervalCommits, first_offsets, next_offsets, partition_lag, poll_batch
from consumers.settings import PipelineConfig
from fpocmh_core import schemas

log = logging.getLogger(__name__)

LAG_EVERY_S = 5.0
# A lost broker is fenced within seconds (broker.session.timeout.ms); sampling as often shows a short outage.
BROKERS_EVERY_S = 2.0
PROBE_EVERY_S = 2.0
# librdkafka's transaction.timeout.ms default; a transactional producer's messages time out with it.
TRANSACTION_MESSAGE_TIMEOUT_MS = 60_000
# A dead letter that would not fit under the message limit keeps this much of the original value.
DEAD_LETTER_PREFIX_BYTES = 4096
# Room for a dead letter's headers and the record framing.
DEAD_LETTER_OVERHEAD_BYTES = 16384
# Commit errors that only mean the partition moved to another member during a rebalance: the new
# owner reads the batch again (at-least-once), so the role carries on.
_REBALANCE_ERRORS = {
    KafkaError.REBALANCE_IN_PROGRESS,
    KafkaError.ILLEGAL_GENERATION,
    KafkaError.UNKNOWN_MEMBER_ID,
    KafkaError._NO_OFFSET,
    KafkaError._STATE,
}
# Commit errors that mean "no coordinator right now" (an outage, a moving coordinator): retried.
_COMMIT_RETRY = {
    KafkaError._TRANSPORT,
    KafkaError._TIMED_OUT,
    KafkaError._WAIT_COORD,
    KafkaError._ALL_BROKERS_DOWN,
    KafkaError.COORDINATOR_NOT_AVAILABLE,
    KafkaError.NOT_COORDINATOR,
    KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
    KafkaError.REQUEST_TIMED_OUT,
}


class DeliveryError(RuntimeError):
    """The broker refused produced messages: the batch is not committed."""


class TransactionInterrupted(RuntimeError):
    """A transaction that can't be trusted to finish (the broker went away meanwhile): it is redone."""


class RoleStopped(RuntimeError):
    """A failure no message caused (configuration, a fenced transactional producer): the role stops."""


def _record_size(msg: Message) -> int:
    headers = msg.headers()
    size = len(msg) + len(msg.key() or b"")  # len(msg): the value's length
    return size + sum(len(k) + len(v or b"") for k, v in headers) if headers else size


class Runtime:
    """A role's producer, stop flag, metrics and dead-letter route, and the poll loop around them."""

    def __init__(
        self,
        cfg: PipelineConfig,
        role: str,
        metrics: Metrics,
        stop: threading.Event | None = None,
        producer_props: Mapping[str, Any] | None = None,
        transactional_id: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.role = role
        self.metrics = metrics
        self.stop = stop or threading.Event()
        self.health = health.for_role(role, cfg.bootstrap_servers, cfg.broker.loss_timeout_s)
        self.health.gauge = metrics.broker_up
        self.health.errors = metrics.broker_errors
        metrics.broker_up.labels(role).set(1 if self.health.is_up else 0)
        self._failures: list[str] = []
        # Before the producer: initialising a transactional one may already probe for the broker.
        self._last_probe = 0.0
        props = dict(producer_props or {})
        if transactional_id:
            props["transactional.id"] = transactional_id
            # A transaction must end within transaction.timeout.ms, so its messages can't wait for ever;
            # a batch whose delivery times out is aborted and read again instead.
            props.setdefault("message.timeout.ms", TRANSACTION_MESSAGE_TIMEOUT_MS)
        self._props = props
        self.producer: Producer = make_producer(cfg, role, on_delivery=self._on_delivery, **props)
        self.transactional = bool(transactional_id)
        if self.transactional:
            # Also aborts whatever the previous incarnation under this id left open (a kill -9 mid-batch).
            self._txn(self.producer.init_transactions, cfg.flush_timeout_s)
        self._produced: collections.Counter[str] = collections.Counter()
        # Per (topic, partition): the offset the group coordinator confirmed last (sync commits, and async
        # ones through ``on_commit``, which the consumer must be given). Below it nothing is read again.
        self.committed: dict[tuple[str, int], int] = {}
        self._last_lag: dict[int, float] = {}

    # ------------------------------------------------------------------------------------- producing

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            if err.code() in health.REFUSED and not self._failures:
                self.health.refused(err)  # once per batch: flush() then stops the batch (DeliveryError)
            self._failures.append(f"{msg.topic()}: {err.str()}")

    def produce(
        self,
        topic: str,
        value: bytes,
        key: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
        partition: int | None = None,
    ) -> None:
        kwargs: dict[str, Any] = {"key": key, "headers": headers}
        if partition is not None and partition >= 0:
            kwargs["partition"] = partition
        while True:
            try:
                self.producer.produce(topic, value, **kwargs)
                break
            except BufferError:
                # The local queue is full: serve delivery reports until there is room.
                self.producer.poll(0.05)
            except KafkaException as exc:
                raise DeliveryError(f"{self.role}: {topic} refused a message: {exc.args[0].str()}") from None
        self._produced[topic] += 1

    def produce_keyed(
        self, topic: str, records: Iterable[tuple[bytes, bytes]], headers: list[tuple[str, bytes]]
    ) -> None:
        """:meth:`produce` for many (key, value) records with the same headers, at a fraction of the Python
        cost per record; a record the client does not take at once goes through :meth:`produce`."""
        produce, n = self.producer.produce, 0
        for key, value in records:
            try:
                produce(topic, value, key, headers=headers)
            except (BufferError, KafkaException):
                self.produce(topic, value, key=key, headers=headers)
                continue
            n += 1
        self._produced[topic] += n

    def flush(self) -> None:
        """Wait until every produced message is acknowledged; raise if the broker refused any.

        While the broker is away this keeps waiting (``broker.loss_timeout_s`` decides for how long); after
        ``flush_timeout_s`` without acknowledgements the broker counts as lost. Stopping while messages are
        still unacknowledged raises: the batch stays uncommitted and is read again.
        """
        waited = 0.0
        while True:
            left = self.producer.flush(1.0)
            if self._failures:
                failures, self._failures = self._failures, []
                self._produced.clear()
                raise DeliveryError(f"{self.role}: {len(failures)} message(s) refused: {failures[0]}")
            if not left:
                break
            waited += 1.0
            if waited >= self.cfg.flush_timeout_s:
                self.health.lost(f"{left} message(s) unacknowledged after {waited:.0f} s")
                if self.stop.is_set():
                    raise DeliveryError(f"{self.role}: stopping with {left} unacknowledged message(s); not committed")
            self.health.check()
            self._probe()
        self.health.back()
        produced, self._produced = self._produced, collections.Counter()
        for topic, n in produced.items():
            self.metrics.messages_produced.labels(self.role, topic).inc(n)

    def _probe(self) -> None:
        """While the broker is away, ask for metadata every few seconds to notice it coming back."""
        now = time.monotonic()
        if not self.health.is_up and now - self._last_probe >= PROBE_EVERY_S:
            self._last_probe = now
            self.health.probe(self.producer)

    def dead_letter(self, msg: Message, reason: str, detail: str) -> None:
        """Route ``msg`` to the dead-letter topic, with why and where it came from in headers.

        The value and headers go unchanged when they fit under the message limit; otherwise the dead
        letter is a bounded record (``dlq.truncated``: the first bytes of the value, no original headers),
        so a message the broker would refuse never stops the role. ``dlq.size`` and ``dlq.sha256`` always
        describe the whole original value, which stays findable at its source offset.
        """
        value = msg.value() or b""
        ours = [
            (schemas.DLQ_REASON, reason.encode()),
            (schemas.DLQ_DETAIL, detail[:1000].encode()),
            (schemas.DLQ_ROLE, self.role.encode()),
            (schemas.DLQ_TOPIC, msg.topic().encode()),
            (schemas.DLQ_PARTITION, str(msg.partition()).encode()),
            (schemas.DLQ_OFFSET, str(msg.offset()).encode()),
            (schemas.DLQ_SIZE, str(len(value)).encode()),
            (schemas.DLQ_SHA256, hashlib.sha256(value).hexdigest().encode()),
        ]
        key = msg.key()
        if _record_size(msg) + DEAD_LETTER_OVERHEAD_BYTES > self.cfg.message_max_bytes:
            value, key = value[:DEAD_LETTER_PREFIX_BYTES], (key or b"")[:256]
            headers = [*ours, (schemas.DLQ_TRUNCATED, b"1")]
        else:
            headers = [*(msg.headers() or []), *ours]
        self.produce(self.cfg.topics.dead_letters, value, key=key, headers=headers)
        self.metrics.dead_letters.labels(self.role, reason).inc()
        log.warning(
            "%s: %s[%d]@%d -> dead letters (%s: %s)",
            self.role,
            msg.topic(),
            msg.partition(),
            msg.offset(),
            reason,
            detail,
        )

    # ------------------------------------------------------------------------------------- consuming

    def decode_all(self, msgs: list[Message], decode: Callable[[Message], Any]) -> list[Decoded]:
        """Decode a polled batch; errors from the client are logged, unreadable messages dead-lettered."""
        out: list[Decoded] = []
        per_topic: collections.Counter[str] = collections.Counter()
        for msg in msgs:
            err = msg.error()
            if err is not None:
                if err.fatal():
                    raise KafkaException(err)
                if err.code() in health.REFUSED:
                    # Not retried: the principal may not read this topic or join this group, and asking
                    # again every poll would only hide that.
                    raise self.health.refused(err)
                if err.code() in health.LOST:
                    self.health.on_error(err)
                elif err.code() != KafkaError._PARTITION_EOF:
                    log.warning("%s: consumer error: %s", self.role, err.str())
                continue
            per_topic[msg.topic()] += 1
            size = _record_size(msg)
            if size > self.cfg.message_max_bytes:
                self.dead_letter(msg, "oversize", f"{size} bytes, over message_max_bytes {self.cfg.message_max_bytes}")
                continue
            try:
                out.append(Decoded(msg, decode(msg)))
            except schemas.SchemaError as exc:
                self.dead_letter(msg, exc.reason, exc.detail)
        for topic, n in per_topic.items():
            self.metrics.messages_consumed.labels(self.role, topic).inc(n)
        return out

    def on_commit(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        """The consumer's ``on_commit`` callback: notes what the coordinator confirmed. A refused async
        commit only means its batch may be read again (at least once), so it is logged, not raised."""
        if err is not None:
            if err.code() != KafkaError._NO_OFFSET:
                log.info("%s: an asynchronous commit failed (%s); its batch may be read again", self.role, err.str())
            return
        self._confirmed(tp for tp in partitions if tp.error is None)

    def _confirmed(self, offsets: Iterable[TopicPartition]) -> None:
        for tp in offsets:
            key = (tp.topic, tp.partition)
            self.committed[key] = max(self.committed.get(key, 0), tp.offset)

    def commit(self, consumer: Consumer, offsets: list[TopicPartition]) -> bool:
        """Synchronous commit, retried while the coordinator is away; False (logged) when a rebalance took
        the partitions away first, or the role is stopping before the coordinator came back."""
        if not offsets:
            return True
        while True:
            try:
                consumer.commit(offsets=offsets, asynchronous=False)
                self._confirmed(offsets)
                self.health.back()
                return True
            except KafkaException as exc:
                code = exc.args[0].code()
                if code in _REBALANCE_ERRORS:
                    log.warning("%s: commit skipped (%s); the partitions' new owner re-reads them", self.role, exc)
                    return False
                if code not in _COMMIT_RETRY:
                    raise
                self.health.lost(f"commit failed: {exc.args[0].str()}")
                if self.stop.is_set():
                    log.warning("%s: stopping before the commit went through; the batch is read again", self.role)
                    return False
                self.health.check()
                self._probe()
                time.sleep(0.5)

    def _txn(self, call: Callable[..., Any], *args: Any) -> None:
        """One transactional producer call, retried while retriable; fenced or fatal stops the role."""
        while True:
            try:
                call(*args)
                return
            except KafkaException as exc:
                err = exc.args[0]
                if err.fatal():
                    raise RoleStopped(
                        f"{self.role}: transactional producer failed for good ({err.str()}); another copy with the "
                        "same transactional id took over, or the broker refused it"
                    ) from None
                if not err.retriable() or self.stop.is_set():
                    raise
                self.health.lost(err.str())
                self.health.check()
                self._probe()

    def _process(self, handler: Handler, batch: list[Decoded]) -> None:
        self._isolated(handler.process, batch)

    def _isolated(self, call: Callable[[list[Decoded]], Any], batch: list[Decoded]) -> list[Any]:
        """``[call(batch)]``; when it raises, the batch again one message at a time, and the message that
        still raises goes to the dead-letter topic (reason ``process``): one bad message never stops a role."""
        try:
            return [call(batch)]
        except (DeliveryError, RoleStopped, health.BrokerUnavailable, KafkaException):
            raise
        except Exception as exc:
            if len(batch) == 1:
                self.dead_letter(batch[0].msg, "process", f"{type(exc).__name__}: {exc}")
                return []
            log.warning("%s: a batch of %d raised (%s); one message at a time now", self.role, len(batch), exc)
        return [out for item in batch for out in self._isolated(call, [item])]

    def _batch(
        self,
        consumer: Consumer,
        handler: Handler,
        msgs: list[Message],
        commit: bool,
        interval: IntervalCommits | None = None,
    ) -> None:
        batch = self.decode_all(msgs, handler.decode)
        if batch:
            self._process(handler, batch)
        self._finish(consumer, handler, msgs, commit, interval=interval)

    def _finish(
        self,
        consumer: Consumer,
        handler: Handler,
        msgs: list[Message],
        commit: bool,
        async_commit: bool = False,
        interval: IntervalCommits | None = None,
    ) -> None:
        """Wait until the batch's outputs are acknowledged, then commit its offsets (or leave them to
        ``interval``)."""
        self.flush()
        faults.point(f"{self.role}.before_commit")
        if commit and interval is not None:
            interval.add(next_offsets(msgs))
        elif commit and async_commit:
            consumer.commit(offsets=next_offsets(msgs), asynchronous=True)
        elif commit:
            self.commit(consumer, next_offsets(msgs))
        consumed = getattr(handler, "consumed", None)
        if consumed is not None:
            consumed(msgs)

    def _overlapped(self, consumer: Consumer, handler: Pipelined, msgs: list[Message], pending: list[Message]) -> None:
        """At least once, overlapped: this batch is prepared while the broker acknowledges the pending
        one, whose commit is then sent without waiting for the coordinator (``committed`` learns when it
        went through); a crash before it did re-reads both batches. A pause or a stop commits at once."""
        emits = self._isolated(handler.prepare, batch) if (batch := self.decode_all(msgs, handler.decode)) else []
        if pending:
            self._finish(consumer, handler, pending, commit=True, async_commit=True)
        for emit in emits:
            emit()

    def _transaction(self, consumer: Consumer, handler: Handler, msgs: list[Message]) -> None:
        """The batch's outputs and its input offsets in one transaction; on failure, a fresh producer under the
        same transactional id (which aborts the open transaction) and the batch read again."""
        outages = self.health.outages
        self._txn(self.producer.begin_transaction)
        try:
            batch = self.decode_all(msgs, handler.decode)
            if batch:
                self._process(handler, batch)
            faults.point(f"{self.role}.before_commit")
            if self.health.outages != outages or not self.health.is_up:
                # librdkafka can block for ever in send_offsets_to_transaction once its group coordinator
                # went away (confluentinc/librdkafka#5456, #5511): a batch that saw the broker go is redone.
                raise TransactionInterrupted("the broker went away during the batch")
            timeout = self.cfg.flush_timeout_s
            metadata = consumer.consumer_group_metadata()
            self._bounded(self.producer.send_offsets_to_transaction, next_offsets(msgs), metadata, timeout)
            self._bounded(self.producer.commit_transaction, timeout)
            self.health.back()
        except (KafkaException, TransactionInterrupted) as exc:
            if isinstance(exc, KafkaException) and exc.args[0].fatal():
                raise RoleStopped(
                    f"{self.role}: transactional producer failed for good ({exc.args[0].str()})"
                ) from None
            log.warning("%s: transaction not committed (%s); the batch is read again", self.role, exc)
            self._renew_producer()
            self._rewind(consumer, msgs)
            return
        produced, self._produced = self._produced, collections.Counter()
        for topic, n in produced.items():
            self.metrics.messages_produced.labels(self.role, topic).inc(n)

    def _bounded(self, call: Callable[..., Any], *args: Any) -> None:
        """A transactional call that must return within its timeout plus a margin (see ``_transaction``)."""
        box: list[BaseException | None] = []

        def attempt() -> None:
            try:
                call(*args)
                box.append(None)
            except BaseException as exc:  # handed to the calling thread
                box.append(exc)

        worker = threading.Thread(target=attempt, name=f"fpocmh-{self.role}-txn", daemon=True)
        worker.start()
        worker.join(self.cfg.flush_timeout_s + 10)
        if not box:
            raise TransactionInterrupted(f"{getattr(call, '__name__', call)} did not return; abandoning this producer")
        if box[0] is not None:
            raise box[0]

    def _renew_producer(self) -> None:
        """Drop the producer (its messages purged) and start one under the same transactional id: initialising
        it aborts whatever the old one left open and fences the old one off."""
        old, self.producer = (
            self.producer,
            make_producer(self.cfg, self.role, on_delivery=self._on_delivery, **self._props),
        )
        try:
            old.purge()
        except (KafkaException, RuntimeError) as exc:
            log.info("%s: purging the old producer: %s", self.role, exc)
        self._failures.clear()
        self._produced.clear()
        self._txn(self.producer.init_transactions, self.cfg.flush_timeout_s)

    def _rewind(self, consumer: Consumer, msgs: list[Message]) -> None:
        for tp in first_offsets(msgs):
            try:
                consumer.seek(tp)
            except KafkaException as exc:  # revoked meanwhile: its new owner reads it from the committed offset
                log.info("%s: not re-reading %s[%d] (%s)", self.role, tp.topic, tp.partition, exc.args[0].str())

    def run(
        self,
        consumer: Consumer,
        handler: Handler,
        batch_size: int,
        poll_timeout_s: float,
        commit: bool = True,
        before_close: Callable[[], None] | None = None,
        fill_batches: bool = False,
        commit_every_s: float | None = None,
    ) -> None:
        """Poll until the stop flag is set, then call ``before_close`` and close the consumer.

        ``commit_every_s`` for a role whose redone batch is harmless: no batch waits for the coordinator,
        and offsets go out asynchronously at most that often (:class:`IntervalCommits`), the last at stop.

        With ``commit=False`` the handler commits (the learner, after its checkpoints). With
        ``fill_batches`` a poll waits up to ``poll_timeout_s`` for a full batch (throughput roles:
        fewer, larger output batches) instead of returning with the first message (latency roles).
        """
        interval = IntervalCommits(commit_every_s) if commit and commit_every_s is not None else None
        overlap = commit and interval is None and not self.transactional and hasattr(handler, "prepare")
        pending: list[Message] = []  # an overlapped batch produced, not yet acknowledged and committed
        brokers = self.watch_brokers()
        try:
            while not self.stop.is_set():
                self.health.check()
                self._probe()
                handler.idle()
                if fill_batches:
                    msgs = consumer.consume(batch_size, poll_timeout_s)
                else:
                    msgs = poll_batch(consumer, batch_size, poll_timeout_s)
                if msgs:
                    start = time.perf_counter()
                    if self.transactional:
                        self._transaction(consumer, handler, msgs)
                    elif overlap:
                        self._overlapped(consumer, handler, msgs, pending)  # type: ignore[arg-type]
                        pending = msgs
                    else:
                        self._batch(consumer, handler, msgs, commit, interval)
                    self.metrics.batch_duration.labels(self.role).observe(time.perf_counter() - start)
                elif pending:  # the stream paused: no batch to overlap with
                    self._finish(consumer, handler, pending, commit=True)
                    pending = []
                if interval is not None and (due := interval.take()):
                    consumer.commit(offsets=due, asynchronous=True)
                self.update_lag(consumer)
            if pending:
                self._finish(consumer, handler, pending, commit=True)
            if interval is not None:
                self.commit(consumer, interval.take(force=True))
            if before_close is not None:
                before_close()
            log.info("%s: stopped: last batch flushed and committed; closing", self.role)
        finally:
            brokers.close()
            try:
                if not self.transactional:
                    self.producer.flush(self.cfg.flush_timeout_s)
            finally:
                consumer.close()

    def watch_brokers(self) -> health.BrokerWatch:
        """The brokers the metadata lists, every few seconds (``fpocmh_brokers``, a line when one goes or all
        are back): on a replicated cluster a lost broker stops nothing, so nothing else would show it."""
        admin = make_admin(self.cfg, self.role)
        gauge = self.metrics.brokers.labels(self.role)
        return health.BrokerWatch(admin, self.cfg.topics.codes, self.health, gauge, BROKERS_EVERY_S).start()

    def update_lag(self, consumer: Consumer) -> None:
        """Per partition: the high watermark the last fetch reported minus our position.

        The cached watermark comes with every fetch response, which is right on real Kafka and on
        tansu alike (tansu's ListOffsets "latest" is not).
        """
        now = time.monotonic()
        if now - self._last_lag.get(id(consumer), 0.0) < LAG_EVERY_S:
            return
        self._last_lag[id(consumer)] = now
        for lag in partition_lag(consumer):
            self.metrics.consumer_lag.labels(self.role, lag.topic, str(lag.partition)).set(lag.offset)
