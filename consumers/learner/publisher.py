"""The learner's versions leaving it: checkpoints on disk, then the parts on the models topic.

Checkpoints are ``v000012/`` folders (state plus a manifest with the input offsets) under a ``LATEST``
pointer. Publishing (serialise, checkpoint, produce the parts, wait for acks) runs on a background thread,
one version at a time, so learning goes on meanwhile.
"""

from __future__ import annotations

import logging
import queue
import shutil
import threading
import time
from pathlib import Path

from consumers.learner.held_codes import Offsets
from consumers.metrics import Metrics
from consumers.models import publish_model
from consumers.runtime import Runtime
from consumers.settings import PipelineConfig
from fpocmh_core.learners.base import published
from fpocmh_core.state import ModelState, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)


class Checkpoints:
    """``v000012/`` folders (state + manifest with input offsets) and a ``LATEST`` pointer."""

    def __init__(self, directory: str | Path, keep: int = 3) -> None:
        self.directory = Path(directory)
        self.keep = max(1, keep)

    def latest(self) -> tuple[ModelState, Offsets, dict[str, str]] | None:
        """(state, input offsets, topic ids the offsets refer to) of the newest checkpoint."""
        pointer = self.directory / "LATEST"
        if not pointer.is_file():
            return None
        state, manifest = load_checkpoint(self.directory / pointer.read_text().strip())
        offsets = {(t, int(p)): int(o) for t, parts in manifest["offsets"].items() for p, o in parts.items()}
        return state, offsets, dict(manifest.get("topic_ids", {}))

    def save(self, state: ModelState, offsets: Offsets, topic_ids: dict[str, str] | None = None) -> Path:
        by_topic: dict[str, dict[str, int]] = {}
        for (topic, partition), offset in sorted(offsets.items()):
            by_topic.setdefault(topic, {})[str(partition)] = offset
        name = f"v{state.version:06d}"
        manifest = {"offsets": by_topic, "topic_ids": topic_ids or {}, "saved_at": time.time()}
        save_checkpoint(state, self.directory / name, manifest)
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
        self.topic_ids: dict[str, str] = {}
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
            self.checkpoints.save(state, offsets, self.topic_ids)
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
