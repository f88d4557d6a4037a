"""What the benchmarks feed the pipeline and how they watch it: tagged configs, stream messages, a
version 0 of the deployed shape, producing and counting messages."""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any


def tagged(cfg: Any, tag: str) -> Any:
    """``cfg`` with topics and groups of its own, so measurements never see each other's messages.
    Its roles serve no metrics: the benchmark measures them itself, and copies would share a port."""
    from consumers.settings import Topics

    topics = Topics(**{f.name: f"{getattr(cfg.topics, f.name)}.{tag}" for f in dataclasses.fields(Topics)})
    own = dataclasses.replace(
        cfg,
        topics=topics,
        encoder=dataclasses.replace(cfg.encoder, group=f"{cfg.encoder.group}.{tag}", metrics_port=0),
        query=dataclasses.replace(cfg.query, group=f"{cfg.query.group}.{tag}", metrics_port=0),
        learner=dataclasses.replace(cfg.learner, metrics_port=0),
        replay=dataclasses.replace(cfg.replay, metrics_port=0),
    )
    if cfg.security.broker_login:
        # ACLs name topics and groups literally or by prefix: the new names need their own.
        from consumers.credentials import apply_acls

        apply_acls(own)
    return own


def stream_messages(ds: Any, split: Any, p1cfg: Any, n: int) -> list[tuple[bytes, bytes, list]]:
    """(key, value, headers) of ``n`` P1 stream arrivals; the stream repeats with new item ids."""
    from fpocmh_core import schemas
    from fpocmh_core.protocols import p1_chunk_records
    from fpocmh_core.records import ItemRecord
    from producers.replay import wire_dtypes

    records = [r for c in range(len(split.chunks)) for r in p1_chunk_records(ds, split, p1cfg, c)]
    dtypes = wire_dtypes(ds)
    out = []
    for i in range(n):
        r = records[i % len(records)]
        item = ItemRecord(r.item_id + 1_000_000 * (i // len(records)), r.image, r.text, r.labels, r.chunk)
        value, headers = schemas.encode_arrival(item, dtypes)
        out.append((str(item.item_id).encode(), value, headers))
    return out


def model_state(ds: Any, bits: int) -> Any:
    """Version 0 for throughput and latency: the deployed shape (1024 hidden), weights don't matter."""
    from fpocmh_core.nets import HashModel

    return state_of(HashModel.create(ds.dims, bits, hidden=(1024,)))


def state_of(model: Any) -> Any:
    """Version 0 of the deployed FPO-CMH ``model``, as the learner publishes it."""
    from fpocmh_core.state import ModelState

    return ModelState("fpocmh", 0, None, model.tensors(), {"arch": model.arch()})


def publish(cfg: Any, state: Any, metrics: Any) -> None:
    from consumers.models import publish_model
    from consumers.runtime import Runtime

    rt = Runtime(cfg, "learner", metrics)
    publish_model(rt, state)
    rt.flush()


class Counter(threading.Thread):
    """Counts messages on a topic (all partitions, from the start) and notes when ``target`` is reached."""

    def __init__(self, cfg: Any, topic: str) -> None:
        from confluent_kafka import OFFSET_BEGINNING

        from consumers.kafka import assign_all, make_consumer

        super().__init__(daemon=True)
        self.consumer = make_consumer(cfg, "bench", None, 10)
        assign_all(self.consumer, topic, OFFSET_BEGINNING)
        self.count = 0
        self.target = 0
        self.reached = threading.Event()
        self.reached_at = 0.0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            self.count += sum(1 for m in self.consumer.consume(10000, 0.05) if m.error() is None)
            if self.target and self.count >= self.target and not self.reached.is_set():
                self.reached_at = time.perf_counter()
                self.reached.set()
        self.consumer.close()

    def wait_for(self, target: int, timeout_s: float) -> float:
        self.reached.clear()
        self.target = target
        if self.count >= target:
            self.reached_at = time.perf_counter()
            self.reached.set()
        if not self.reached.wait(timeout_s):
            raise TimeoutError(f"{self.count} of {target} messages after {timeout_s:.0f} s")
        return self.reached_at


def produce_all(cfg: Any, topic: str, messages: list[tuple[bytes, bytes, list]], metrics: Any) -> float:
    """Produce as fast as the client takes them; returns the time of the first produce."""
    from consumers.runtime import Runtime

    rt = Runtime(cfg, "replay", metrics)
    start = time.perf_counter()
    for key, value, headers in messages:
        rt.produce(topic, value, key=key, headers=headers)
    rt.flush()
    return start
