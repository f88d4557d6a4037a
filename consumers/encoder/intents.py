"""At-least-once encoders write down which model version codes which offsets *before* they code them.

Without transactions a batch whose codes were acknowledged but whose offsets were not committed (a
crash in between) is read again, and by then a newer model version may be in use: the key would get a
second, different code. So, per arrivals partition, an encoder keeps on the ``encoder_state`` topic
(compacted, key ``<group>:<topic>:<partition>``) the ranges of offsets it is coding and their versions,
written and acknowledged before the codes. A restarted encoder, or the partition's next owner after a
rebalance, codes offsets inside a recorded range with that range's version: the duplicate is the same
code, in the store, after compaction and after any restart. Ranges below the committed offset are
dropped at the next write, so a record stays a few ranges long.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from confluent_kafka import Message

from consumers.runtime import Runtime
from consumers.topic_reader import TopicReader
from fpocmh_core import schemas
from fpocmh_core.schemas import CodingRange

log = logging.getLogger(__name__)

Partition = tuple[str, int]


class IntentLog:
    """The ranges recorded for this group's partitions, read from the topic and extended before coding."""

    def __init__(self, rt: Runtime, group: str) -> None:
        self.rt = rt
        self.group = group
        self.topic = rt.cfg.topics.encoder_state
        self.ranges: dict[Partition, tuple[CodingRange, ...]] = {}

    def refresh(self) -> None:
        """Read the topic to its end: what every encoder of the group recorded (called on each assignment)."""
        prefix = f"{self.group}:".encode()
        reader = TopicReader(self.rt, self.topic, _decode, fetch_wait_max_ms=10)
        try:
            while not self.rt.stop.is_set():
                for item in reader.poll(10_000, 0.2):
                    key = item.msg.key() or b""
                    if key.startswith(prefix):
                        topic, _, partition = key[len(prefix) :].decode().rpartition(":")
                        self.ranges[(topic, int(partition))] = item.value
                if reader.caught_up():
                    return
        finally:
            reader.close()

    def version_at(self, partition: Partition, offset: int) -> int | None:
        """The version recorded for ``offset`` of ``partition``, or None when nothing was recorded for it."""
        for r in self.ranges.get(partition, ()):
            if r.start <= offset < r.stop:
                return r.version
        return None

    def record(self, batch: Iterable[tuple[Partition, CodingRange]], committed: dict[Partition, int]) -> None:
        """Add these ranges (dropping those wholly below ``committed``) and wait until the broker has them."""
        touched = {}
        for partition, new in batch:
            floor = committed.get(partition, 0)
            kept = [r for r in self.ranges.get(partition, ()) if r.stop > floor and r != new]
            touched[partition] = self.ranges[partition] = (*kept, new)
        for (topic, partition), ranges in touched.items():
            key = schemas.intent_key(self.group, topic, partition)
            self.rt.produce(self.topic, schemas.encode_intent(ranges), key=key, headers=schemas.INTENT_HEADERS)
        self.rt.flush()


def _decode(msg: Message) -> tuple[CodingRange, ...]:
    return schemas.decode_intent(msg.value(), msg.headers())
