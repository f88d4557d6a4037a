"""Where a role stands in its partitions: batches polled, offsets to commit or seek to, lag.

Pure functions over consumers and messages (and :class:`IntervalCommits`' bookkeeping), shared by the poll
loop, the query tier's readers and the learner.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from confluent_kafka import Consumer, KafkaException, Message, TopicPartition


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
        if msg.error() is None:
            key = (msg.topic(), msg.partition())
            top[key] = max(top.get(key, -1), msg.offset())
    return [TopicPartition(t, p, o + 1) for (t, p), o in top.items()]


def first_offsets(msgs: Iterable[Message]) -> list[TopicPartition]:
    """Where to seek to read ``msgs`` again: the first offset of each partition."""
    low: dict[tuple[str, int], int] = {}
    for msg in msgs:
        if msg.error() is None:
            key = (msg.topic(), msg.partition())
            low[key] = min(low.get(key, msg.offset()), msg.offset())
    return [TopicPartition(t, p, o) for (t, p), o in low.items()]


class IntervalCommits:
    """Offsets of finished batches, sent to the coordinator at most once per ``every_s`` (and at stop).

    For a role whose redone batch is harmless (queries: a second answer is ignored by its correlation
    id), a commit per batch only loads the broker: each is a request plus an append to the offsets
    topic, and on a shared machine that work lands in the middle of the shards' scans. A crash redoes
    at most ``every_s`` worth of batches (requests older than ``query.max_request_age_s`` are skipped).
    """

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self._due: dict[tuple[str, int], TopicPartition] = {}
        self._sent_at = time.monotonic()

    def add(self, offsets: Iterable[TopicPartition]) -> None:
        for tp in offsets:
            self._due[(tp.topic, tp.partition)] = tp

    def take(self, force: bool = False) -> list[TopicPartition]:
        """The offsets to commit now: all that are due once ``every_s`` passed (or ``force``), else none."""
        now = time.monotonic()
        if not self._due or (not force and now - self._sent_at < self.every_s):
            return []
        due, self._due, self._sent_at = list(self._due.values()), {}, now
        return due


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
