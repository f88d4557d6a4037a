"""The one poll loop every role runs, and what it needs: stop flag, producer, dead letters, commits, lag.

One batch goes: poll -> decode each message (unreadable ones go to the dead-letter topic with the
reason and their source topic/partition/offset) -> process -> flush the producer and wait for every
delivery report -> only then commit the batch's offsets. A crash anywhere before the commit means the
batch is read again (at-least-once); it never means a committed input whose output was lost.

SIGTERM and the first Ctrl-C only set a flag: the loop finishes its batch, flushes, commits and closes
the consumer (leaving the group at once). A second Ctrl-C interrupts for real.
"""

from __future__ import annotations

import collections
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from consumers.kafka import assign_all, make_consumer, make_producer
from consumers.metrics import Metrics
from consumers.settings import PipelineConfig
from fpocmh_core import schemas

log = logging.getLogger(__name__)

LAG_EVERY_S = 5.0
# Commit errors that only mean the partition moved to another member during a rebalance: the new
# owner reads the batch again (at-least-once), so the role carries on.
_REBALANCE_ERRORS = {
    KafkaError.REBALANCE_IN_PROGRESS,
    KafkaError.ILLEGAL_GENERATION,
    KafkaError.UNKNOWN_MEMBER_ID,
    KafkaError._NO_OFFSET,
    KafkaError._STATE,
}


class DeliveryError(RuntimeError):
    """The broker did not acknowledge produced messages: the batch is not committed."""


def install_signal_handlers(stop: threading.Event) -> None:
    """SIGTERM and the first SIGINT set ``stop``; a second SIGINT raises KeyboardInterrupt as usual."""

    def on_signal(signum: int, _frame: object) -> None:
        log.info("%s received: stopping cleanly (a second Ctrl-C interrupts)", signal.Signals(signum).name)
        stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


@dataclass(frozen=True, slots=True)
class Decoded:
    msg: Message
    value: Any


class Handler(Protocol):
    """What a role plugs into :meth:`Runtime.run`."""

    def decode(self, msg: Message) -> Any:
        """The message's value, or raise :class:`schemas.SchemaError` (it goes to the dead-letter topic)."""

    def process(self, batch: list[Decoded]) -> None:
        """Handle a batch; produce outputs with :meth:`Runtime.produce`. Raising stops the role uncommitted."""

    def idle(self) -> None:
        """Called before every poll, batch or not (model hot swaps, store updates, publishing)."""


def poll_batch(consumer: Consumer, max_messages: int, timeout_s: float) -> list[Message]:
    """Wait up to ``timeout_s`` for a first message, then take what is already fetched, up to ``max_messages``.

    ``Consumer.consume(n, timeout)`` would wait for ``n`` messages or the whole timeout, which puts the
    timeout on every request's latency.
    """
    first = consumer.poll(timeout_s)
    if first is None:
        return []
    return [first, *consumer.consume(max_messages - 1, 0)] if max_messages > 1 else [first]


def next_offsets(msgs: Iterable[Message]) -> list[TopicPartition]:
    """The offsets to commit after ``msgs``: one past the last message of each partition."""
    top: dict[tuple[str, int], int] = {}
    for msg in msgs:
        key = (msg.topic(), msg.partition())
        top[key] = max(top.get(key, -1), msg.offset())
    return [TopicPartition(t, p, o + 1) for (t, p), o in top.items()]


class Runtime:
    """A role's producer, stop flag, metrics and dead-letter route, and the poll loop around them."""

    def __init__(
        self,
        cfg: PipelineConfig,
        role: str,
        metrics: Metrics,
        stop: threading.Event | None = None,
        producer_props: Mapping[str, Any] | None = None,
    ) -> None:
        self.cfg = cfg
        self.role = role
        self.metrics = metrics
        self.stop = stop or threading.Event()
        self._failures: list[str] = []
        self.producer: Producer = make_producer(cfg, role, on_delivery=self._on_delivery, **(producer_props or {}))
        self._produced: collections.Counter[str] = collections.Counter()
        self._last_lag: dict[int, float] = {}

    # ------------------------------------------------------------------------------------- producing

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
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
        self._produced[topic] += 1

    def flush(self) -> None:
        """Wait until every produced message is acknowledged; raise if any was not."""
        left = self.producer.flush(self.cfg.flush_timeout_s)
        failures, self._failures = self._failures, []
        produced, self._produced = self._produced, collections.Counter()
        if left or failures:
            raise DeliveryError(
                f"{self.role}: {left} message(s) unacknowledged after {self.cfg.flush_timeout_s} s, "
                f"{len(failures)} failed{': ' + failures[0] if failures else ''}"
            )
        for topic, n in produced.items():
            self.metrics.messages_produced.labels(self.role, topic).inc(n)

    def dead_letter(self, msg: Message, reason: str, detail: str) -> None:
        """Route ``msg`` unchanged to the dead-letter topic, with why and where it came from in headers."""
        headers = list(msg.headers() or [])
        headers += [
            (schemas.DLQ_REASON, reason.encode()),
            (schemas.DLQ_DETAIL, detail[:1000].encode()),
            (schemas.DLQ_ROLE, self.role.encode()),
            (schemas.DLQ_TOPIC, msg.topic().encode()),
            (schemas.DLQ_PARTITION, str(msg.partition()).encode()),
            (schemas.DLQ_OFFSET, str(msg.offset()).encode()),
        ]
        self.produce(self.cfg.topics.dead_letters, msg.value() or b"", key=msg.key(), headers=headers)
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
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("%s: consumer error: %s", self.role, err.str())
                continue
            per_topic[msg.topic()] += 1
            try:
                out.append(Decoded(msg, decode(msg)))
            except schemas.SchemaError as exc:
                self.dead_letter(msg, exc.reason, exc.detail)
        for topic, n in per_topic.items():
            self.metrics.messages_consumed.labels(self.role, topic).inc(n)
        return out

    def commit(self, consumer: Consumer, offsets: list[TopicPartition]) -> bool:
        """Synchronous commit; False (logged) when a rebalance took the partitions away first."""
        if not offsets:
            return True
        try:
            consumer.commit(offsets=offsets, asynchronous=False)
            return True
        except KafkaException as exc:
            if exc.args[0].code() not in _REBALANCE_ERRORS:
                raise
            log.warning("%s: commit skipped (%s); the partitions' new owner re-reads them", self.role, exc.args[0])
            return False

    def run(
        self,
        consumer: Consumer,
        handler: Handler,
        batch_size: int,
        poll_timeout_s: float,
        commit: bool = True,
        before_close: Callable[[], None] | None = None,
        fill_batches: bool = False,
    ) -> None:
        """Poll until the stop flag is set, then call ``before_close`` and close the consumer.

        With ``commit=False`` the handler commits (the learner, after its checkpoints). With
        ``fill_batches`` a poll waits up to ``poll_timeout_s`` for a full batch (throughput roles:
        fewer, larger output batches) instead of returning with the first message (latency roles).
        """
        try:
            while not self.stop.is_set():
                handler.idle()
                if fill_batches:
                    msgs = consumer.consume(batch_size, poll_timeout_s)
                else:
                    msgs = poll_batch(consumer, batch_size, poll_timeout_s)
                if msgs:
                    start = time.perf_counter()
                    batch = self.decode_all(msgs, handler.decode)
                    if batch:
                        handler.process(batch)
                    self.flush()
                    if commit:
                        self.commit(consumer, next_offsets(msgs))
                    self.metrics.batch_duration.labels(self.role).observe(time.perf_counter() - start)
                self.update_lag(consumer)
            if before_close is not None:
                before_close()
            log.info("%s: stopped: last batch flushed and committed; closing", self.role)
        finally:
            try:
                self.producer.flush(self.cfg.flush_timeout_s)
            finally:
                consumer.close()

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


def partition_lag(consumer: Consumer) -> list[TopicPartition]:
    """Messages behind the high watermark per assigned partition (``offset`` holds the lag)."""
    try:
        positions = consumer.position(consumer.assignment())
    except KafkaException:
        return []
    out = []
    for tp in positions:
        _low, high = consumer.get_watermark_offsets(tp, cached=True)
        if high >= 0:
            out.append(TopicPartition(tp.topic, tp.partition, max(0, high - max(tp.offset, 0))))
    return out


class TopicReader:
    """Reads every partition of a topic from its beginning with ``assign()``: no group, no commits.

    For state rebuilt from a topic (the code store, the model in use): each reader needs all of it.
    ``caught_up`` compares the position with the high watermark of the first fetch response of each
    partition, i.e. "read to where the topic ended when we started".
    """

    def __init__(
        self,
        rt: Runtime,
        topic: str,
        decode: Callable[[Message], Any],
        fetch_wait_max_ms: int,
    ) -> None:
        self.rt = rt
        self.topic = topic
        self.decode = decode
        self.consumer = make_consumer(rt.cfg, rt.role, None, fetch_wait_max_ms)
        self.partitions = assign_all(self.consumer, topic, OFFSET_BEGINNING)
        self._end: dict[int, int] = {}
        self._caught_up = False

    def poll(self, max_messages: int, timeout_s: float) -> list[Decoded]:
        msgs = poll_batch(self.consumer, max_messages, timeout_s)
        return self.rt.decode_all(msgs, self.decode) if msgs else []

    def caught_up(self) -> bool:
        if self._caught_up:
            return True
        for tp in self.partitions:
            if tp.partition not in self._end:
                _low, high = self.consumer.get_watermark_offsets(tp, cached=True)
                if high < 0:
                    return False  # no fetch response yet
                self._end[tp.partition] = high
        positions = self.consumer.position(self.partitions)
        self._caught_up = all(self._position(tp) >= self._end[tp.partition] for tp in positions)
        return self._caught_up

    def _position(self, tp: TopicPartition) -> int:
        if tp.offset >= 0:
            return tp.offset
        # Nothing consumed yet: we stand at the low watermark (above 0 once retention deleted the head).
        low, _high = self.consumer.get_watermark_offsets(tp, cached=True)
        return max(low, 0)

    def close(self) -> None:
        self.consumer.close()
