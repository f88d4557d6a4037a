"""Codes a learner assigns itself, held until the encoder's code of the same view is on the codes topic.

A learner code replaces the encoder's code of a view (FPO-CMH's ``learner_codes``: the model that learnt
the view codes it; DLCH's codes for the items of an increment). Both go to the compacted codes topic
under the view's key, and there the last write is the code that stays: in the query store, after
compaction, after a restart. So the learner's must be the second write. The encoder commits an arrival's
offset only once that arrival's codes are acknowledged (at least once) or in the transaction that wrote
them (exactly once): an offset its group has committed means the codes before it are on the topic. A
learner code therefore waits until the encoder group has committed past every partition position the
learner had read up to when it made the code, and is produced then, in the order the codes were made.

Held codes live in memory. Codes held past ``learner.max_held_codes`` (an encoder down for long), or still
held when the learner stops or crashes, are dropped: those views keep the encoder's code, one code per
key everywhere, only not the learner's. ``fpocmh_learner_codes_total`` counts both outcomes.
"""

from __future__ import annotations

import logging
import time
from collections import deque

from confluent_kafka import Consumer, KafkaException, TopicPartition

from consumers.kafka import make_consumer
from consumers.runtime import Runtime
from fpocmh_core import schemas

log = logging.getLogger(__name__)

# (topic, partition) -> next offset: a reader's position, or a group's committed offsets.
Offsets = dict[tuple[str, int], int]
# How often the encoder group's committed offsets are read while codes are held.
REFRESH_S = 0.2
# How long a stopping learner keeps releasing held codes.
CLOSE_GRACE_S = 2.0


class HeldCodes:
    """Learner codes in the order they were made, each batch with the learner's read position when made."""

    def __init__(self, rt: Runtime, max_held: int) -> None:
        self.rt = rt
        self.max_held = max_held
        self.batches: deque[tuple[Offsets, list[tuple[bytes, bytes]]]] = deque()
        self.held = 0
        self.committed: Offsets = {}
        self._reader: Consumer | None = None
        self._refreshed = 0.0

    def hold(self, position: Offsets, codes: list[tuple[bytes, bytes]]) -> None:
        """``codes`` as (key, encoded code), made after the learner had read up to ``position``."""
        if not codes:
            return
        self.batches.append((dict(position), codes))
        self.held += len(codes)
        self.rt.metrics.learner_codes_held.set(self.held)
        if self.held > self.max_held:
            self._drop_oldest(self.held - self.max_held)
        self.release()

    def _drop_oldest(self, n: int) -> None:
        self._drop(n, f"more than learner.max_held_codes={self.max_held} held")
        while n:
            position, codes = self.batches[0]
            if len(codes) > n:
                self.batches[0] = (position, codes[n:])
                return
            self.batches.popleft()
            n -= len(codes)

    def release(self, refresh: bool = False) -> int:
        """Produce the held codes the encoder group has committed past, oldest first; returns how many."""
        if not self.batches:
            return 0
        if refresh or time.monotonic() - self._refreshed >= REFRESH_S:
            self._refresh()
        written = 0
        while self.batches and self._covered(self.batches[0][0]):
            _position, codes = self.batches.popleft()
            for key, body in codes:
                self.rt.produce(self.rt.cfg.topics.codes, body, key=key, headers=schemas.CODE_HEADERS)
            written += len(codes)
        if written:
            self.held -= written
            self.rt.metrics.learner_codes.labels("written").inc(written)
            self.rt.metrics.learner_codes_held.set(self.held)
        return written

    def close(self, grace_s: float = CLOSE_GRACE_S) -> None:
        """Release for up to ``grace_s`` (an encoder stopping alongside commits its last batch meanwhile);
        what the encoder group has not committed past by then is dropped."""
        try:
            deadline = time.monotonic() + grace_s
            while self.batches:
                self.release(refresh=True)
                if not self.batches or time.monotonic() >= deadline:
                    break
                time.sleep(REFRESH_S)
            if self.held:
                self._drop(self.held, "the learner stopped before the encoder had committed past them")
                self.batches.clear()
        finally:
            reader, self._reader = self._reader, None
            if reader is not None:
                reader.close()

    def _covered(self, position: Offsets) -> bool:
        return all(self.committed.get(tp, -1) >= offset for tp, offset in position.items())

    def _refresh(self) -> None:
        self._refreshed = time.monotonic()
        wanted = sorted({tp for position, _codes in self.batches for tp in position})
        if self._reader is None:
            # The encoder's group id, to read its committed offsets; never subscribes, so it never joins.
            self._reader = make_consumer(self.rt.cfg, "learner-codes", self.rt.cfg.encoder.group, 10)
        try:
            got = self._reader.committed([TopicPartition(t, p) for t, p in wanted], timeout=5.0)
        except KafkaException as exc:
            log.debug("learner: encoder offsets not read (%s); codes stay held", exc)
            return
        self.committed = {(tp.topic, tp.partition): tp.offset for tp in got if tp.error is None and tp.offset >= 0}

    def _drop(self, n: int, why: str) -> None:
        self.held -= n
        self.rt.metrics.learner_codes.labels("dropped").inc(n)
        self.rt.metrics.learner_codes_held.set(self.held)
        log.warning("learner: %d learner codes dropped (%s); those views keep the encoder's code", n, why)
