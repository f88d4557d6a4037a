"""Model updates on the models topic: publishing a version in parts, and following the newest one.

A version is applied only after every check passed: all parts there and the SHA-256 right, the HMAC
right when a key is configured (``security``), the version inside the state equal to the one in the
part headers and newer than the one in use, and the model itself sound (finite weights, probe codes
not collapsed: :mod:`fpocmh_core.model_check`). A version that fails is refused: a dead letter with
reason ``model``, ``fpocmh_model_refused_total``, and the role keeps the version it has.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from confluent_kafka import Message

from consumers.kafka import follow_wait_ms
from consumers.runtime import Runtime
from consumers.topic_reader import TopicReader
from fpocmh_core import schemas
from fpocmh_core.learners.base import model_from_state
from fpocmh_core.model_check import Probe, model_problems
from fpocmh_core.nets import HashModel
from fpocmh_core.state import ModelState, StateError
from fpocmh_core.validation import ArrivalCheck

log = logging.getLogger(__name__)

# Room for the part header, the key, the record headers and the record-batch framing.
PART_OVERHEAD_BYTES = 16384
# Accepted versions kept ready besides the newest: an at-least-once encoder re-coding a batch after a
# crash needs the version the batch's first attempt used (consumers/intents.py).
RECENT_VERSIONS = 8
# A new version is taken at most this late on a broker that holds an empty fetch (tansu).
MODELS_FETCH_WAIT_MS = 50


def publish_model(rt: Runtime, state: ModelState, body: bytes | None = None) -> int:
    """Produce ``state`` to the models topic in parts (not flushed); returns the serialized size."""
    body = state.to_bytes() if body is None else body
    max_part = rt.cfg.message_max_bytes - PART_OVERHEAD_BYTES
    for part in schemas.split_model_update(body, state.version, state.parent_version, max_part, rt.cfg.model_key()):
        rt.produce(
            rt.cfg.topics.models,
            schemas.encode_model_part(part),
            key=schemas.model_part_key(part),
            headers=schemas.model_part_headers(part),
        )
    return len(body)


def _decode_part(msg: Message) -> schemas.ModelPart:
    return schemas.decode_model_part(msg.value(), msg.headers())


@dataclass(frozen=True)
class ModelVersion:
    """A verified model update, with its hash model rebuilt and ready to encode."""

    state: ModelState
    model: HashModel
    published_at: float  # Unix time of the update's last part
    arrivals: ArrivalCheck  # what an arrival must satisfy to be coded or learnt with this model

    @property
    def version(self) -> int:
        return self.state.version


def arrival_check(model: HashModel, probe: Probe | None, max_item_id: int) -> ArrivalCheck:
    """The arrival check for ``model``: its input sizes, and the label count version 0 recorded."""
    n_labels = None if probe is None else probe.n_labels
    return ArrivalCheck(model.image.in_dim, model.text.in_dim, n_labels, max_item_id)


def warn_unauthenticated(role: str, key: bytes | None) -> None:
    if key is None:
        log.warning(
            "%s: model updates are checksummed but not authenticated: no model key configured "
            "(security.model_key_file, $FPOCMH_MODEL_KEY_FILE or $FPOCMH_MODEL_KEY)",
            role,
        )


class ModelFollower:
    """Follows the models topic on a background thread and keeps the newest version ready.

    The thread reads the topic from the start, reassembles and verifies every newer version and
    rebuilds its hash model; the role takes the newest one between batches (:meth:`take`). So a new
    version takes effect at a batch boundary, every output records the version that produced it, and
    the poll loop never waits while a large update is checked and parsed.
    """

    def __init__(self, rt: Runtime) -> None:
        # Its own producer for dead letters: the role's may be transactional, and this runs on another thread.
        self.rt = Runtime(rt.cfg, rt.role, rt.metrics, rt.stop)
        self.fetch_wait_ms = follow_wait_ms(rt.cfg, MODELS_FETCH_WAIT_MS)
        self.reader = TopicReader(self.rt, rt.cfg.topics.models, _decode_part, self.fetch_wait_ms)
        self.assembler = schemas.ModelUpdateAssembler()
        self.key = rt.cfg.model_key()
        warn_unauthenticated(rt.role, self.key)
        # The probe of the first version accepted checks every later one (an update can't bring its own).
        self.probe: Probe | None = None
        self.error: BaseException | None = None
        self._ready: ModelVersion | None = None
        self._recent: dict[int, ModelVersion] = {}
        self._lock = threading.Lock()
        self._caught_up = threading.Event()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._follow, name=f"fpocmh-{rt.role}-models", daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        try:
            while not self._closing.is_set():
                ready = self._read(0.2)
                if ready is not None:
                    with self._lock:
                        self._ready = ready
                if not self._caught_up.is_set() and self.reader.caught_up():
                    self._caught_up.set()
        except BaseException as exc:  # surfaced on the role's thread by ``take``
            self.error = exc
            log.exception("%s: following %s failed", self.rt.role, self.rt.cfg.topics.models)

    def _read(self, timeout_s: float) -> ModelVersion | None:
        """The newest version that the parts which arrived complete and that passes every check, or None."""
        newest: ModelVersion | None = None
        while True:
            batch = self.reader.poll(16, timeout_s)
            if not batch:
                break
            timeout_s = 0.0
            for item in batch:
                try:
                    update = self.assembler.add(item.value)
                except schemas.SchemaError as exc:
                    self._refuse(item.msg, exc.reason, exc.detail)
                    continue
                if update is not None:
                    newest = self._verify(update, item.msg) or newest
        return newest

    def _verify(self, update: schemas.ModelUpdate, msg: Message) -> ModelVersion | None:
        """The update as a ready model if it passes every check; else refused (dead letter) and None."""
        what = f"model version {update.version}"
        problem = update.signature_problem(self.key)
        if problem:
            self.assembler.refuse(update.version)
            self._refuse(msg, "model", f"{what}: {problem}")
            return None
        try:
            state = ModelState.from_bytes(update.body, checksum=update.sha256)
            model = model_from_state(state)
        except (StateError, KeyError, RuntimeError) as exc:  # unreadable state, or tensors not matching arch
            self.assembler.refuse(update.version)
            self._refuse(msg, "decode", f"{what}: {exc}")
            return None
        if state.version != update.version:
            self.assembler.refuse(update.version)
            self._refuse(msg, "model", f"{what}: the state inside says version {state.version}")
            return None
        model.eval()
        probe = self.probe or Probe.of(state)
        problems = model_problems(model, probe, self.rt.cfg.model_check)
        if problems:
            self.assembler.refuse(update.version)
            self._refuse(msg, "model", f"{what}: " + "; ".join(problems))
            return None
        self.assembler.accept(update.version)
        self.probe = probe
        checks = arrival_check(model, probe, self.rt.cfg.validation.max_item_id)
        ready = ModelVersion(state, model, msg.timestamp()[1] / 1000.0, checks)
        with self._lock:
            self._recent[ready.version] = ready
            for old in sorted(self._recent)[:-RECENT_VERSIONS]:
                del self._recent[old]
        return ready

    def recent(self, version: int) -> ModelVersion | None:
        """An accepted version still kept (the newest few), or None."""
        with self._lock:
            return self._recent.get(version)

    def _refuse(self, msg: Message, reason: str, detail: str) -> None:
        self.rt.metrics.model_refused.labels(self.rt.role).inc()
        self.rt.dead_letter(msg, reason, detail)
        self.rt.flush()

    def take(self) -> ModelVersion | None:
        """The newest version not taken yet, or None; never waits."""
        if self.error is not None:
            raise RuntimeError("following the models topic failed") from self.error
        with self._lock:
            ready, self._ready = self._ready, None
        if ready is not None:
            m = self.rt.metrics
            m.model_version.labels(self.rt.role).set(ready.version)
            m.model_updates.labels(self.rt.role).inc()
            m.model_published.labels(self.rt.role).set(ready.published_at)
            parent = ready.state.parent_version
            log.info("%s: model version %d (parent %s) applied", self.rt.role, ready.version, parent)
        return ready

    def wait_first(self, stop: threading.Event, timeout_s: float | None = None) -> ModelVersion | None:
        """Block until the topic has been read to its end and holds a version (None if ``stop`` is set
        or the timeout passes first): a restarted role starts with the newest version at once."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        waited_since = time.monotonic()
        while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
            if self._caught_up.wait(0.2) and self._ready is not None:
                return self.take()
            if self.error is not None:
                return self.take()
            if time.monotonic() - waited_since > 30:
                log.info("%s: still waiting for a first model on %s", self.rt.role, self.rt.cfg.topics.models)
                waited_since = time.monotonic()
        return None

    def close(self) -> None:
        self._closing.set()
        self._thread.join(10)
        self.reader.close()
