"""A shard's reader of the codes topic: its own partitions, from given offsets, decoded in bulk.

Unlike :class:`consumers.topic_reader.TopicReader` (every partition from the beginning, one Python object
per message), this reader starts where a snapshot left off, decodes a whole fetch into numpy rows at
once, tracks the next offset per partition (what the store reflects), and notices when the topic was
reset under it (recreated: a partition now ends below our position), so the store can be rebuilt
instead of serving codes the broker no longer has.

Where the topic ends comes from fetch-response watermarks (``get_watermark_offsets(cached=True)``),
right on Apache Kafka and tansu alike. ``auto.offset.reset=error`` turns an out-of-range position into
an error event on Kafka; tansu sends no error and no records then, so a partition without any fetch
response for ``STUCK_S`` is checked with ListOffsets instead.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException, Message, TopicPartition

from consumers.kafka import make_consumer, query_fetch_wait_ms, reader_isolation
from consumers.offsets import poll_batch
from consumers.runtime import Runtime
from fpocmh_core import schemas

log = logging.getLogger(__name__)

_RESET_ERRORS = {KafkaError._AUTO_OFFSET_RESET, KafkaError.OFFSET_OUT_OF_RANGE}
# A partition with no fetch response for this long is checked with ListOffsets (tansu's silent stall).
STUCK_S = 10.0
HEADER_STRIDE = 16


class TopicReset(RuntimeError):
    """The codes topic no longer holds what the store reflects."""


class CodeLog:
    def __init__(
        self,
        rt: Runtime,
        topic: str,
        partitions: list[int],
        start: Mapping[int, int] | None = None,
    ) -> None:
        cfg = rt.cfg
        self.rt = rt
        self.topic = topic
        self.bits = cfg.bits
        self.partitions = sorted(partitions)
        self.next = {p: int((start or {}).get(p, 0)) for p in self.partitions}
        self.model_versions: set[int] = set()
        self.consumer = make_consumer(
            cfg,
            rt.role,
            None,
            query_fetch_wait_ms(cfg),
            **{
                "auto.offset.reset": "error",
                "isolation.level": reader_isolation(cfg),
                # Large fetches: a catch-up of millions of codes makes fewer round trips (100k -> 160k codes/s).
                "max.partition.fetch.bytes": 16 << 20,
                "fetch.max.bytes": 64 << 20,
            },
        )
        self._tps = [TopicPartition(topic, p) for p in self.partitions]
        self._none = np.zeros(0, schemas.code_row_dtype(self.bits))
        # Offset 0 as "the beginning": retention may have moved the start of a partition past 0.
        self.consumer.assign([TopicPartition(topic, p, o if o > 0 else OFFSET_BEGINNING) for p, o in self.next.items()])
        self._assigned_at = time.monotonic()
        self._end: dict[int, int] = {}
        self._reset: str | None = None

    # ------------------------------------------------------------------------------------- reading

    def poll(self, max_messages: int, timeout_s: float) -> np.ndarray:
        """The next code rows (:func:`schemas.code_row_dtype`), in topic order; unreadable records go
        to the dead-letter topic. Per message only the client's accessors run in Python."""
        msgs = poll_batch(self.consumer, max_messages, timeout_s)
        # The consumer's position is one past the last record it handed out: one call per poll
        # instead of two per message.
        self.next.update((tp.partition, tp.offset) for tp in self.consumer.position(self._tps) if tp.offset >= 0)
        good = [m for m in msgs if m.error() is None]
        if len(good) < len(msgs):
            self._client_errors([m for m in msgs if m.error() is not None])
        if not good:
            return self._none
        self.rt.metrics.messages_consumed.labels(self.rt.role, self.topic).inc(len(good))
        plain = self._plain_headers(good)
        fast = np.flatnonzero(plain)
        rows, rejected = schemas.decode_code_rows([good[i].value() for i in fast], self.bits)
        slow = np.sort(np.concatenate([fast[rejected], np.flatnonzero(~plain)]))
        if slow.size:
            # Rare: other header layouts or broken records, decoded one by one (the broken ones are
            # dead-lettered with their reason) and put back in topic order, so the newest write of a
            # key still wins.
            kept = np.setdiff1d(fast, slow, assume_unique=True)
            checked = {int(i): c for i in slow if (c := self._decode_or_dead_letter(good[i])) is not None}
            order = np.argsort(np.concatenate([kept, np.fromiter(checked, np.int64, len(checked))]), kind="stable")
            rows = np.concatenate([rows, self._as_rows(list(checked.values()))])[order]
        if rows.size:
            self.model_versions.update(np.unique(rows["model_version"]).tolist())
        return rows

    @staticmethod
    def _plain_headers(msgs: list[Message]) -> np.ndarray:
        """Which messages carry exactly the code schema's v1 headers. Reading a message's headers costs
        1-4 us, as much as everything else per message, so only every HEADER_STRIDE-th message and the
        last are looked at unless one of those differs (then all are). Every body is still checked
        for size, modality, source and bits before it is used."""
        sample = range(0, len(msgs), HEADER_STRIDE)
        if all(msgs[i].headers() == schemas.CODE_HEADERS for i in (*sample, len(msgs) - 1)):
            return np.ones(len(msgs), bool)
        return np.fromiter((m.headers() == schemas.CODE_HEADERS for m in msgs), bool, len(msgs))

    def _client_errors(self, msgs: list[Message]) -> None:
        for msg in msgs:
            err = msg.error()
            if err.code() in _RESET_ERRORS:
                self._reset = f"partition {msg.partition()}: {err.str()}"
            elif err.fatal():
                raise KafkaException(err)
            elif err.code() != KafkaError._PARTITION_EOF:
                log.warning("%s: codes reader: %s", self.rt.role, err.str())

    def _decode_or_dead_letter(self, msg: Message) -> schemas.CodeMessage | None:
        try:
            return self._decode_one(msg)
        except schemas.SchemaError as exc:
            self.rt.dead_letter(msg, exc.reason, exc.detail)
            return None

    def _decode_one(self, msg: Message) -> schemas.CodeMessage:
        code = schemas.decode_code(msg.value(), msg.headers())
        if code.bits != self.bits:
            raise schemas.SchemaError("shape", f"code of {code.bits} bits in a {self.bits}-bit store")
        return code

    def _as_rows(self, codes: list[schemas.CodeMessage]) -> np.ndarray:
        rows = np.zeros(len(codes), schemas.code_row_dtype(self.bits))
        if codes:
            rows["item_id"] = [c.item_id for c in codes]
            rows["modality"] = [int(c.modality) for c in codes]
            rows["model_version"] = [c.model_version for c in codes]
            rows["code"] = np.stack([c.code for c in codes])
            rows["bits"] = self.bits
        return rows

    # ------------------------------------------------------------------------------------- position

    def high(self, partition: int) -> int:
        """The high watermark of the last fetch response (-1 before the first)."""
        _low, high = self.consumer.get_watermark_offsets(TopicPartition(self.topic, partition), cached=True)
        return high if high >= 0 else -1

    def caught_up(self) -> bool:
        """Read to where every partition ended at its first fetch response."""
        for p in self.partitions:
            if p not in self._end:
                high = self.high(p)
                if high < 0:
                    return False
                self._end[p] = high
        return all(self.next[p] >= self._end[p] for p in self.partitions)

    def offsets(self) -> schemas.Offsets:
        return tuple(sorted(self.next.items()))

    def behind(self, bound: Mapping[int, int]) -> dict[int, int]:
        """Owned partitions whose next offset is below ``bound``, with the bound's offset."""
        return {p: o for p, o in bound.items() if p in self.next and self.next[p] < o}

    def lag(self) -> int:
        """Messages between our positions and the high watermarks last reported."""
        return sum(max(0, self.high(p) - self.next[p]) for p in self.partitions if self.high(p) >= 0)

    def check_reset(self) -> None:
        """Raise :class:`TopicReset` when a partition ends below our position."""
        if self._reset is not None:
            raise TopicReset(self._reset)
        for p in self.partitions:
            high = self.high(p)
            if 0 <= high < self.next[p]:
                raise TopicReset(f"partition {p} ends at {high}, below the store's next offset {self.next[p]}")
            if high < 0 and self.next[p] > 0 and time.monotonic() - self._assigned_at > STUCK_S:
                _low, listed = self.consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=10)
                if 0 <= listed < self.next[p]:
                    raise TopicReset(f"partition {p} lists its end at {listed}, below the store's {self.next[p]}")

    def close(self) -> None:
        self.consumer.close()
