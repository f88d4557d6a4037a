"""The learner role: arrivals in (its own group), model versions out, checkpoints on disk.

Delivery semantics. The learner's state after an item is what counts, so a checkpoint stores the
state together with the input offsets whose effect it includes, and input offsets are committed
only after that checkpoint is on disk. On restart the learner loads the newest checkpoint and seeks
each partition to the checkpoint's offsets: items learnt after the checkpoint are learnt again, items
before it never twice. Model versions are published after their checkpoint, so a version on the
topic always has a checkpoint; a crash before a publish finishes is repaired by the restart, which
publishes the version it resumed from (readers ignore versions they already hold).

Publishing (serialise, checkpoint, produce the parts, wait for acks) runs on a background thread,
one version at a time; the poll loop only copies the tensors, so the learner keeps polling well within
``max.poll.interval.ms``. Arrivals of the offline part (``chunk == -1``) are skipped: version 0
was trained on them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import queue
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from confluent_kafka import Consumer, Message, TopicPartition

from consumers.kafka import make_consumer
from consumers.metrics import MODALITIES, Metrics
from consumers.models import publish_model
from consumers.runtime import Decoded, Runtime, next_offsets
from consumers.settings import PipelineConfig
from fpocmh_core import schemas
from fpocmh_core.learners.base import OnlineLearner, published
from fpocmh_core.learners.registry import learner_class, learner_from_state
from fpocmh_core.records import ItemRecord
from fpocmh_core.state import ModelState, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)

Offsets = dict[tuple[str, int], int]


def detached(state: ModelState) -> ModelState:
    """A copy sharing no array with the learner, which keeps learning while the copy is published
    (an exported state may hold live arrays that ``learn`` updates in place, e.g. anchor bank rows)."""
    tensors = {name: np.array(value, copy=True) for name, value in state.tensors.items()}
    return dataclasses.replace(state, tensors=tensors, meta=json.loads(json.dumps(state.meta)))


class Checkpoints:
    """``v000012/`` folders (state + manifest with input offsets) and a ``LATEST`` pointer."""

    def __init__(self, directory: str | Path, keep: int = 3) -> None:
        self.directory = Path(directory)
        self.keep = max(1, keep)

    def latest(self) -> tuple[ModelState, Offsets] | None:
        pointer = self.directory / "LATEST"
        if not pointer.is_file():
            return None
        state, manifest = load_checkpoint(self.directory / pointer.read_text().strip())
        return state, {(t, int(p)): int(o) for t, parts in manifest["offsets"].items() for p, o in parts.items()}

    def save(self, state: ModelState, offsets: Offsets) -> Path:
        by_topic: dict[str, dict[str, int]] = {}
        for (topic, partition), offset in sorted(offsets.items()):
            by_topic.setdefault(topic, {})[str(partition)] = offset
        name = f"v{state.version:06d}"
        save_checkpoint(state, self.directory / name, {"offsets": by_topic, "saved_at": time.time()})
        # The pointer moves only once the folder is complete, so a crash mid-save keeps the previous one.
        tmp = self.directory / "LATEST.tmp"
        tmp.write_text(name)
        tmp.replace(self.directory / "LATEST")
        for old in sorted(self.directory.glob("v[0-9]*"))[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return self.directory / name


class Publisher:
    """Serialises, checkpoints and publishes versions on its own thread, one at a time."""

    def __init__(self, cfg: PipelineConfig, metrics: Metrics, checkpoints: Checkpoints) -> None:
        self.rt = Runtime(cfg, "learner", metrics)
        self.checkpoints = checkpoints
        self._jobs: queue.Queue[tuple[ModelState, Offsets] | None] = queue.Queue(maxsize=1)
        self._done: queue.Queue[tuple[int, Offsets]] = queue.Queue()
        self._busy = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="fpocmh-publisher", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        return self._busy.is_set()

    def submit(self, state: ModelState, offsets: Offsets) -> None:
        self._busy.set()
        self._jobs.put((state, offsets))

    def publish_now(self, state: ModelState, offsets: Offsets, checkpoint: bool = True) -> None:
        """Checkpoint and publish on the calling thread (start-up and shutdown); the caller commits.

        ``checkpoint=False`` when the state is the newest checkpoint already (a resumed learner).
        """
        self.wait()
        self._publish(state, offsets, checkpoint)

    def done(self) -> list[tuple[int, Offsets]]:
        """(version, offsets) of every publish finished since the last call."""
        out = []
        while not self._done.empty():
            out.append(self._done.get_nowait())
        return out

    def wait(self) -> None:
        self._jobs.join()
        if self.error is not None:
            raise RuntimeError("model publishing failed") from self.error

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=self.rt.cfg.flush_timeout_s + 30)
        self.rt.producer.flush(self.rt.cfg.flush_timeout_s)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                if self.error is None:
                    self._publish(*job)
                    self._done.put((job[0].version, job[1]))
            except BaseException as exc:  # surfaced on the poll thread by ``wait``/``check``
                self.error = exc
                log.exception("learner: publishing model version %d failed", job[0].version if job else -1)
            finally:
                self._busy.clear()
                self._jobs.task_done()

    def _publish(self, state: ModelState, offsets: Offsets, checkpoint: bool = True) -> None:
        start = time.perf_counter()
        if checkpoint:
            self.checkpoints.save(state, offsets)
        update = published(state)
        body = update.to_bytes()
        publish_model(self.rt, update, body)
        self.rt.flush()
        m = self.rt.metrics
        m.model_update_bytes.observe(len(body))
        m.model_updates.labels("learner").inc()
        m.model_version.labels("learner").set(state.version)
        m.model_published.labels("learner").set(time.time())
        log.info(
            "learner: published model version %d (%.1f MB) in %.2f s",
            state.version,
            len(body) / 1e6,
            time.perf_counter() - start,
        )

    def check(self) -> None:
        if self.error is not None:
            raise RuntimeError("model publishing failed") from self.error


class LearnerRole:
    """The learner's :class:`~consumers.runtime.Handler`."""

    def __init__(self, rt: Runtime, learner: OnlineLearner, publisher: Publisher, offsets: Offsets) -> None:
        self.rt = rt
        self.learner = learner
        self.publisher = publisher
        self.offsets = dict(offsets)  # next offset per partition whose effect the learner holds
        self.consumer: Consumer | None = None
        self.items_since_publish = 0
        self.last_publish = time.monotonic()
        self.budget_s = rt.cfg.max_poll_interval_ms / 1000.0

    def on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Start each partition where the checkpoint left it, not at the (older) committed offset."""
        for tp in partitions:
            if (tp.topic, tp.partition) in self.offsets:
                tp.offset = self.offsets[(tp.topic, tp.partition)]
        consumer.assign(partitions)

    def decode(self, msg: Message) -> ItemRecord:
        return schemas.decode_arrival(msg.value(), msg.headers())

    def process(self, batch: list[Decoded]) -> None:
        records = [d.value for d in batch if d.value.chunk >= 0]
        if records:
            self._learn(records)
        for tp in next_offsets(d.msg for d in batch):
            self.offsets[(tp.topic, tp.partition)] = tp.offset
        self._maybe_publish()

    def _learn(self, records: list[ItemRecord]) -> None:
        start = time.perf_counter()
        report = self.learner.learn(records)
        took = time.perf_counter() - start
        if took > self.budget_s / 4:
            log.warning("learner: a batch took %.1f s of a %.0f s poll budget; lower batch_size", took, self.budget_s)
        m = self.rt.metrics
        for modality in MODALITIES:
            m.learner_steps.labels(modality).inc(report.steps.get(modality, 0))
        for term, value in report.losses.items():
            m.learner_loss.labels(term).set(value)
        show_bank_rows(self.learner, m)
        present = {r.item_id: r.modalities for r in records}
        for code in report.codes:
            msg = schemas.CodeMessage(
                code.item_id,
                code.modality,
                code.code,
                self.learner.version,
                present.get(code.item_id, (code.modality,)),
                source="learner",
            )
            body = schemas.encode_code(msg)
            self.rt.produce(self.rt.cfg.topics.codes, body, key=msg.key, headers=schemas.CODE_HEADERS)
        self.items_since_publish += len(records)

    def _due(self) -> bool:
        cfg = self.rt.cfg.learner
        if self.items_since_publish == 0 or self.publisher.busy:
            return False
        by_items = cfg.publish_every_items > 0 and self.items_since_publish >= cfg.publish_every_items
        by_time = cfg.publish_every_s > 0 and time.monotonic() - self.last_publish >= cfg.publish_every_s
        return by_items or by_time

    def _next_version(self) -> ModelState:
        self.learner.bump_version()
        self.items_since_publish = 0
        self.last_publish = time.monotonic()
        return detached(self.learner.export_state())

    def _maybe_publish(self) -> None:
        if self._due():
            self.publisher.submit(self._next_version(), dict(self.offsets))

    def idle(self) -> None:
        self.publisher.check()
        self._commit_published()
        self._maybe_publish()

    def _commit_published(self) -> None:
        for _version, offsets in self.publisher.done():
            self._commit(offsets)

    def _commit(self, offsets: Offsets) -> None:
        if self.consumer is not None:
            self.rt.commit(self.consumer, [TopicPartition(t, p, o) for (t, p), o in offsets.items()])

    def finish(self) -> None:
        """On a clean stop: a last version with everything learnt, its checkpoint, then the commit."""
        self.publisher.wait()
        self._commit_published()
        if self.items_since_publish:
            offsets = dict(self.offsets)
            self.publisher.publish_now(self._next_version(), offsets)
            self._commit(offsets)


def show_bank_rows(learner: OnlineLearner, metrics: Metrics) -> None:
    if learner.bank_rows is not None:
        metrics.bank_rows.set(learner.bank_rows)


def initial_learner(cfg: PipelineConfig, data: str | None) -> tuple[OnlineLearner, Offsets, bool]:
    """(learner, offsets, resumed): the newest checkpoint, else ``learner.init``, else version 0 trained
    on the P1 offline part of ``data``."""
    checkpoints = Checkpoints(cfg.learner.checkpoint_dir, cfg.learner.keep_checkpoints)
    found = checkpoints.latest()
    if found is not None:
        state, offsets = found
        log.info("learner: resuming version %d from %s", state.version, checkpoints.directory)
        return learner_from_state(state), offsets, True
    if cfg.learner.init:
        state, _manifest = load_checkpoint(Path(cfg.learner.init))
        log.info("learner: version %d from %s", state.version, cfg.learner.init)
        return learner_from_state(state), {}, False
    return bootstrap_learner(cfg, data), {}, False


def bootstrap_learner(cfg: PipelineConfig, data: str | None, progress: bool = True) -> OnlineLearner:
    """Version 0: the method's offline phase on the P1 offline part (paired, labelled)."""
    from fpocmh_core import config as core_config
    from fpocmh_core.data import load_dataset
    from fpocmh_core.protocols import P1Config, p1_split

    ds = load_dataset(data)
    split = p1_split(ds, core_config.load(P1Config, "p1"))
    overrides: dict[str, Any] = json.loads(json.dumps(dict(cfg.learner.bootstrap_overrides)))
    log.info("learner: training version 0 (%s, %d bits) on %d offline pairs", cfg.method, cfg.bits, split.offline.size)
    return learner_class(cfg.method).bootstrap(ds, split.offline, cfg.bits, overrides, progress)


def run_learner(
    cfg: PipelineConfig,
    metrics: Metrics,
    stop: threading.Event | None = None,
    data: str | None = None,
) -> None:
    """Resume or start the learner, publish the version it starts from, then learn until ``stop``."""
    torch.set_num_threads(cfg.learner.threads)
    learner, offsets, resumed = initial_learner(cfg, data)
    # From start-up on, and kept after the stop: the gauge is the bank the role holds.
    show_bank_rows(learner, metrics)
    checkpoints = Checkpoints(cfg.learner.checkpoint_dir, cfg.learner.keep_checkpoints)
    rt = Runtime(cfg, "learner", metrics, stop)
    publisher = Publisher(cfg, metrics, checkpoints)
    try:
        # Every start publishes the version it starts from; readers holding it already ignore it.
        publisher.publish_now(learner.export_state(), offsets, checkpoint=not resumed)
        role = LearnerRole(rt, learner, publisher, offsets)
        consumer = make_consumer(cfg, "learner", cfg.learner.group, cfg.learner.fetch_wait_max_ms)
        role.consumer = consumer
        consumer.subscribe([cfg.topics.arrivals], on_assign=role.on_assign)
        log.info(
            "learner: %s version %d (%s); consuming %s as group %s",
            cfg.method,
            learner.version,
            "resumed" if resumed else "new",
            cfg.topics.arrivals,
            cfg.learner.group,
        )
        batch, timeout = cfg.learner.batch_size, cfg.learner.poll_timeout_s
        rt.run(consumer, role, batch, timeout, commit=False, before_close=role.finish, fill_batches=True)
    finally:
        publisher.close()
        rt.producer.flush(cfg.flush_timeout_s)
