"""A whole topic read from its beginning, for state rebuilt from a topic (the model in use, intents)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Message, TopicPartition

from consumers.handlers import Decoded
from consumers.kafka import assign_all, make_consumer
from consumers.offsets import poll_batch
from consumers.runtime import Runtime


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
