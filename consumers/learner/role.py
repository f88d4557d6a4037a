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

Guards. Every arrival passes the arrival check before it is learnt (a failing one is dead-lettered). A
batch after which a loss, gradient or parameter is not finite, or whose learning raised, is rolled back
(:mod:`fpocmh_core.learners.guard`) and then learnt one arrival at a time, the arrival that still fails
being dead-lettered. A version whose model fails the model check is never published: the learner goes
back to the last version it published. A checkpoint taken on another incarnation of the arrivals topic
(recreated: another topic id, or offsets past its end) is a restarted stream: ``learner.on_topic_reset``
says whether to stop with a message or to learn the new topic from its beginning.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import torch
from confluent_kafka import Consumer, Message, TopicPartition

from consumers.handlers import Decoded
from consumers.kafka import make_consumer, topic_id, watermarks_are_exact
from consumers.learner.held_codes import HeldCodes, Offsets
from consumers.learner.pacing import Pacer
from consumers.learner.publisher import Checkpoints, Publisher
from consumers.metrics import MODALITIES, Metrics
from consumers.models import arrival_check, warn_unauthenticated
from consumers.offsets import next_offsets, partition_lag
from consumers.runtime import RoleStopped, Runtime
from consumers.settings import PipelineConfig
from fpocmh_core import schemas
from fpocmh_core.config import to_dict as config_dict
from fpocmh_core.learners.base import LearnReport, OnlineLearner
from fpocmh_core.learners.guard import GuardedLearner
from fpocmh_core.learners.registry import learner_class, learner_from_state
from fpocmh_core.model_check import Probe, model_problems
from fpocmh_core.records import ItemRecord
from fpocmh_core.state import ModelState, load_checkpoint

log = logging.getLogger(__name__)

TOPIC_CHECK_EVERY_S = 10.0


class LearnerRole:
    """The learner's :class:`~consumers.handlers.Handler`."""

    def __init__(
        self, rt: Runtime, learner: OnlineLearner, publisher: Publisher, offsets: Offsets, probe: Probe | None
    ) -> None:
        self.rt = rt
        self.guard = GuardedLearner(learner)
        self.publisher = publisher
        self.probe = probe
        self.check = arrival_check(learner.model, probe, rt.cfg.validation.max_item_id)
        self.offsets = dict(offsets)  # next offset per partition whose effect the learner holds
        self.consumer: Consumer | None = None
        self.items_since_publish = 0
        self.last_publish = time.monotonic()
        self.last_published = learner.export_state().detached()
        self.budget_s = rt.cfg.max_poll_interval_ms / 1000.0
        self._topic_checked = time.monotonic()
        self.pacer = Pacer(rt.cfg.learner.pacing)
        self.held = HeldCodes(rt, rt.cfg.learner.max_held_codes)
        self.skipped = 0
        self.pending = 0
        self.last_arrival = time.monotonic()
        rt.metrics.learner_share.set(1.0)

    @property
    def learner(self) -> OnlineLearner:
        return self.guard.learner

    def on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Start each partition where the checkpoint left it, not at the (older) committed offset."""
        for tp in partitions:
            if (tp.topic, tp.partition) in self.offsets:
                tp.offset = self.offsets[(tp.topic, tp.partition)]
        consumer.assign(partitions)

    def decode(self, msg: Message) -> ItemRecord:
        return self.check.check(schemas.decode_arrival(msg.value(), msg.headers()))

    def process(self, batch: list[Decoded]) -> None:
        records = [d.value for d in batch if d.value.chunk >= 0]
        keep = self.pacer.sample(records)
        if len(keep) < len(records):
            self.skipped += len(records) - len(keep)
            self.rt.metrics.learner_items.labels("skipped").inc(len(records) - len(keep))
        self.last_arrival = time.monotonic()
        if keep:
            read = {(tp.topic, tp.partition): tp.offset for tp in next_offsets([d.msg for d in batch])}
            self._learn([records[i] for i in keep], {**self.offsets, **read})
        # The publishing cadence counts the stream read, learnt or skipped.
        self.items_since_publish += len(records)

    def pace(self, msgs: list[Message]) -> None:
        """The lag after this batch sets the share of the next one that is learnt."""
        if self.consumer is None:
            return
        lag = sum(tp.offset for tp in partition_lag(self.consumer))
        newest_ms = max((m.timestamp()[1] for m in msgs if m.error() is None), default=0)
        age = max(0.0, time.time() - newest_ms / 1000.0) if newest_ms > 0 else 0.0
        before = self.pacer.share
        share = self.pacer.update(lag, age)
        self.rt.metrics.learner_share.set(share)
        if (share < 1.0) != (before < 1.0):
            log.warning(
                "learner: %d arrivals behind (bound %d); learning from %.0f%% of them",
                lag,
                self.rt.cfg.learner.pacing.max_lag_items,
                100 * share,
            )

    def consumed(self, msgs: list[Message]) -> None:
        """After a polled batch (learnt or dead-lettered, message by message): its offsets are the learner's."""
        for tp in next_offsets(msgs):
            self.offsets[(tp.topic, tp.partition)] = tp.offset
        self.pace(msgs)
        self._maybe_publish()

    def _learn(self, records: list[ItemRecord], position: Offsets) -> None:
        start = time.perf_counter()
        report = self._guarded(self.guard.learn, records)
        took = time.perf_counter() - start
        if took > self.budget_s / 4:
            log.warning("learner: a batch took %.1f s of a %.0f s poll budget; lower batch_size", took, self.budget_s)
        self._show(report, len(records))
        self._store_codes(report, {r.item_id: r.modalities for r in records}, position)

    def _guarded(self, step: Any, *args: Any) -> LearnReport:
        try:
            return step(*args)
        except Exception:
            self.rt.metrics.learner_rollbacks.inc()
            raise

    def _show(self, report: LearnReport, arrivals: int) -> None:
        m = self.rt.metrics
        m.learner_views_uncoded.set(self.learner.uncoded)  # first: whoever sees the arrivals counted sees this too
        for modality in MODALITIES:
            m.learner_steps.labels(modality).inc(report.steps.get(modality, 0))
        for term, value in report.losses.items():
            m.learner_loss.labels(term).set(value)
        # Learners that learn from each arrival as it comes report no outcomes: each one was learnt.
        for outcome, n in (report.outcomes or {"learned": arrivals}).items():
            m.learner_items.labels(outcome).inc(n)
        m.learner_pending.set(report.pending)
        self.pending = report.pending
        for modality, (gap, weight, lr_scale) in self.learner.rehearsal.items():
            m.learner_drift.labels(modality.short).set(gap)
            m.learner_rehearsal_weight.labels(modality.short).set(weight)
            m.learner_lr_scale.labels(modality.short).set(lr_scale)
        show_bank_rows(self.learner, m)

    def _store_codes(self, report: LearnReport, present: dict[int, tuple[Any, ...]], position: Offsets) -> None:
        """Codes the learner assigned itself go to the codes topic with their source, once the encoder's code
        of each view is there (:mod:`consumers.learner.held_codes`); ``position``: what the learner had read."""
        held = []
        for code in report.codes:
            msg = schemas.CodeMessage(
                code.item_id,
                code.modality,
                code.code,
                self.learner.version,
                code.present or present.get(code.item_id, (code.modality,)),
                source="learner",
            )
            held.append((msg.key, schemas.encode_code(msg)))
        self.held.hold(position, held)

    def _flush_when_quiet(self) -> None:
        """A learner that buffers (DLCH keeps an increment) acts on what it holds once the stream has paused
        for ``learner.flush_after_s``, so the end of a stream is learnt too; its codes and a version follow."""
        quiet = time.monotonic() - self.last_arrival
        holds = self.pending or self.learner.uncoded
        if not holds or self.rt.cfg.learner.flush_after_s <= 0 or quiet < self.rt.cfg.learner.flush_after_s:
            return
        log.info(
            "learner: no arrivals for %.0f s; acting on the %d arrivals it holds and coding the %d views it learnt",
            quiet,
            self.pending,
            self.learner.uncoded,
        )
        report = self._guarded(self.guard.flush)
        self._show(report, 0)
        self._store_codes(report, {}, dict(self.offsets))
        self.rt.flush()
        self.items_since_publish += max(report.items, 1)

    def _due(self) -> bool:
        cfg = self.rt.cfg.learner
        if self.items_since_publish == 0 or self.publisher.busy:
            return False
        by_items = cfg.publish_every_items > 0 and self.items_since_publish >= cfg.publish_every_items
        by_time = cfg.publish_every_s > 0 and time.monotonic() - self.last_publish >= cfg.publish_every_s
        return by_items or by_time

    def _next_version(self) -> ModelState | None:
        """The next version to publish, or None when its model fails the model check (the learner then goes
        back to the last version it published, and what it learnt since is dropped)."""
        self.learner.bump_version()
        self.items_since_publish = 0
        self.last_publish = time.monotonic()
        state = self.learner.export_state().detached()
        problems = model_problems(self.learner.model, self.probe, self.rt.cfg.model_check)
        if problems:
            self.rt.metrics.model_refused.labels("learner").inc()
            log.error(
                "learner: version %d not published (%s); back to version %d",
                state.version,
                "; ".join(problems),
                self.last_published.version,
            )
            self.guard = GuardedLearner(learner_from_state(self.last_published))
            return None
        self.last_published = state
        return state if self.probe is None else self.probe.attach(state)

    def _maybe_publish(self) -> None:
        if self._due():
            state = self._next_version()
            if state is not None:
                self.publisher.submit(state, dict(self.offsets))

    def idle(self) -> None:
        self.held.release()
        self.publisher.check()
        self._commit_published()
        self._flush_when_quiet()
        self._maybe_publish()
        if time.monotonic() - self._topic_checked > TOPIC_CHECK_EVERY_S:
            self._topic_checked = time.monotonic()
            self._watch_topic()

    def _watch_topic(self) -> None:
        """A running learner whose arrivals topic was recreated under it (a broker that came back empty)."""
        topic = self.rt.cfg.topics.arrivals
        known = self.publisher.topic_ids.get(topic)
        now = topic_id(self.rt.cfg, topic)
        if known and now and now != known:
            on_topic_reset(self.rt, topic, f"topic id changed from {known} to {now} while running")
            self.offsets = {k: v for k, v in self.offsets.items() if k[0] != topic}
            self.publisher.topic_ids[topic] = now
            if self.consumer is not None:
                self.consumer.unsubscribe()
                self.consumer.subscribe([topic], on_assign=self.on_assign)

    def _commit_published(self) -> None:
        for _version, offsets in self.publisher.done():
            self._commit(offsets)

    def _commit(self, offsets: Offsets) -> None:
        if self.consumer is not None:
            self.rt.commit(self.consumer, [TopicPartition(t, p, o) for (t, p), o in offsets.items()])

    def finish(self) -> None:
        """On a clean stop: a last version with everything learnt, its checkpoint, then the commit."""
        log.info(
            "learner: largest lag %d arrivals (pacing bound %d); %d skipped to keep within it",
            self.pacer.max_lag_items,
            self.rt.cfg.learner.pacing.max_lag_items,
            self.skipped,
        )
        self.held.close()
        self.publisher.wait()
        self._commit_published()
        if self.items_since_publish:
            offsets = dict(self.offsets)
            state = self._next_version()
            if state is not None:
                self.publisher.publish_now(state, offsets)
                self._commit(offsets)


def on_topic_reset(rt: Runtime, topic: str, why: str) -> None:
    """Apply ``learner.on_topic_reset`` to a restarted stream: stop with the fix named, or go on from its start."""
    rt.metrics.topic_resets.labels(rt.role, topic).inc()
    checkpoints = rt.cfg.learner.checkpoint_dir
    if rt.cfg.learner.on_topic_reset == "stop":
        raise RoleStopped(
            f"learner: {topic} is not the stream the checkpoint in {checkpoints} read ({why}). To learn the new "
            f"stream from its beginning, set learner.on_topic_reset=earliest; to start over from version 0, "
            f"remove {checkpoints}"
        )
    log.warning("learner: %s restarted (%s); learning it from its beginning (learner.on_topic_reset)", topic, why)


def checked_offsets(rt: Runtime, offsets: Offsets, known_ids: dict[str, str]) -> tuple[Offsets, dict[str, str]]:
    """The checkpoint's offsets for the arrivals topic as it is now: ``on_topic_reset`` applied when the topic
    was recreated (another id) or its partitions end before the offsets. Returns (offsets, topic ids now)."""
    topic = rt.cfg.topics.arrivals
    now = topic_id(rt.cfg, topic)
    ids = {topic: now} if now else {}
    why = None
    if known_ids.get(topic) and now and known_ids[topic] != now:
        why = f"topic id {known_ids[topic]} in the checkpoint, {now} now"
    elif offsets and watermarks_are_exact(rt.cfg):
        past = past_end(rt.cfg, {k: v for k, v in offsets.items() if k[0] == topic})
        if past:
            why = f"checkpoint offsets past the partitions' ends: {past}"
    if why is None:
        return offsets, ids
    on_topic_reset(rt, topic, why)
    return {k: v for k, v in offsets.items() if k[0] != topic}, ids


def past_end(cfg: PipelineConfig, offsets: Offsets) -> dict[int, tuple[int, int]]:
    """Partition -> (saved offset, end) for every saved offset beyond its partition's current end."""
    consumer = make_consumer(cfg, "learner", None, 10)
    try:
        out = {}
        for (topic, partition), offset in offsets.items():
            _low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
            if offset > high:
                out[partition] = (offset, high)
        return out
    finally:
        consumer.close()


def show_bank_rows(learner: OnlineLearner, metrics: Metrics) -> None:
    if learner.bank_rows is not None:
        metrics.bank_rows.set(learner.bank_rows)


def initial_state(cfg: PipelineConfig, data: str | None) -> tuple[ModelState, Offsets, dict[str, str], bool]:
    """(state, offsets, topic ids, resumed): the newest checkpoint, else ``learner.init``, else version 0
    trained on the P1 offline part of ``data`` (with its probe set)."""
    checkpoints = Checkpoints(cfg.learner.checkpoint_dir, cfg.learner.keep_checkpoints)
    found = checkpoints.latest()
    if found is not None:
        state, offsets, topic_ids = found
        log.info("learner: resuming version %d from %s", state.version, checkpoints.directory)
        return state, offsets, topic_ids, True
    if cfg.learner.init:
        state, _manifest = load_checkpoint(Path(cfg.learner.init))
        log.info("learner: version %d from %s", state.version, cfg.learner.init)
        return state, {}, {}, False
    return bootstrap_state(cfg, data), {}, {}, False


def bootstrap_state(cfg: PipelineConfig, data: str | None, progress: bool = True) -> ModelState:
    """Version 0 trained on the P1 offline part of ``data``."""
    from fpocmh_core import config as core_config
    from fpocmh_core.data import load_dataset
    from fpocmh_core.protocols import P1Config, p1_split

    ds = load_dataset(data).with_features(cfg.features.image, cfg.features.text)
    split = p1_split(ds, core_config.load(P1Config, "p1"))
    return train_version_zero(cfg, ds, split.offline, progress)


def train_version_zero(cfg: PipelineConfig, ds: Any, rows: Any, progress: bool = True) -> ModelState:
    """The method's offline phase on the paired, labelled ``rows`` of ``ds``, with a probe set from them."""
    overrides: dict[str, Any] = json.loads(json.dumps(config_dict(cfg.learner.bootstrap_overrides)))
    log.info("learner: training version 0 (%s, %d bits) on %d offline pairs", cfg.method, cfg.bits, len(rows))
    learner = learner_class(cfg.method).bootstrap(ds, rows, cfg.bits, overrides, progress)
    probe = Probe.draw(ds.image[rows], ds.text[rows], ds.n_labels, cfg.model_check.probe_items)
    return probe.attach(learner.export_state())


def run_learner(
    cfg: PipelineConfig,
    metrics: Metrics,
    stop: threading.Event | None = None,
    data: str | None = None,
) -> None:
    """Resume or start the learner, publish the version it starts from, then learn until ``stop``."""
    torch.set_num_threads(cfg.learner.threads)
    state, offsets, topic_ids, resumed = initial_state(cfg, data)
    learner = learner_from_state(state)
    probe = Probe.of(state)
    if probe is None:
        log.warning("learner: version %d has no probe set; versions are checked for finite weights only", state.version)
    # From start-up on, and kept after the stop: the gauge is the bank the role holds.
    show_bank_rows(learner, metrics)
    checkpoints = Checkpoints(cfg.learner.checkpoint_dir, cfg.learner.keep_checkpoints)
    rt = Runtime(cfg, "learner", metrics, stop)
    warn_unauthenticated("learner", cfg.model_key())
    offsets, publisher_ids = checked_offsets(rt, offsets, topic_ids)
    publisher = Publisher(cfg, metrics, checkpoints)
    publisher.topic_ids = publisher_ids
    try:
        # Every start publishes the version it starts from; readers holding it already ignore it.
        publisher.publish_now(state if probe is None else probe.attach(state), offsets, checkpoint=not resumed)
        role = LearnerRole(rt, learner, publisher, offsets, probe)
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
