"""Replay a protocol (P1, P2 or P3) as an arrival stream at a set rate, and score the query set against
the live store.

Pacing follows a schedule (item i is due ``i / rate`` seconds after the start), so short stalls are
caught up rather than lost, and the achieved rate is measured per full minute. The protocol's offline
part goes first as paired arrivals with ``chunk = -1`` (coded with version 0, skipped by learners), then
the stream's chunks. For protocols with new labels (P2, P3) the live score is also reported over the
queries with and without a new label.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from consumers.metrics import Metrics
from consumers.query.role import Query, QueryClient
from consumers.runtime import Runtime
from consumers.settings import PipelineConfig
from fpocmh_core import evaluation, schemas
from fpocmh_core.data import CrossModalDataset
from fpocmh_core.protocols import Stream, paired_records
from fpocmh_core.records import ItemRecord, Modality
from producers.drill import BadArrival, bad_arrivals

log = logging.getLogger(__name__)

WINDOW_S = 60.0
OFFLINE_CHUNK = -1


def wire_dtypes(ds: CrossModalDataset) -> schemas.WireDtypes:
    """The most compact lossless encoding of each modality, decided once for the whole dataset."""
    return schemas.WireDtypes(image=schemas.wire_dtype(ds.image), text=schemas.wire_dtype(ds.text))


@dataclass
class RateReport:
    target: float
    items: int = 0
    seconds: float = 0.0
    # (items, seconds) per full window of WINDOW_S seconds of sending time
    windows: list[tuple[int, float]] = field(default_factory=list)
    # bad arrivals of the fault drill, by kind (producers/drill.py)
    bad_sent: dict[str, int] = field(default_factory=dict)

    _window: tuple[int, float] = field(default=(0, 0.0), repr=False)

    def add(self, items: int, seconds: float) -> None:
        """Count ``items`` sent over ``seconds`` of sending time; close a window every WINDOW_S seconds."""
        self.items += items
        self.seconds += seconds
        n, spent = self._window[0] + items, self._window[1] + seconds
        if spent >= WINDOW_S:
            self.windows.append((n, spent))
            n, spent = 0, 0.0
        self._window = (n, spent)

    @property
    def achieved(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else 0.0

    @property
    def worst_window_error(self) -> float | None:
        """Largest relative deviation from the target over any full minute (None: no full minute)."""
        if not self.target or not self.windows:
            return None
        return max(abs(n / s - self.target) / self.target for n, s in self.windows)

    def summary(self) -> str:
        text = f"{self.items} items in {self.seconds:.1f} s: {self.achieved:,.0f} items/s"
        if self.target:
            text += f" (target {self.target:,.0f}, {100 * (self.achieved / self.target - 1):+.1f}%"
            worst = self.worst_window_error
            if worst is not None:
                text += f"; worst of {len(self.windows)} full minute(s) off by {100 * worst:.1f}%"
            text += ")"
        return text


class Replayer:
    """Produces arrivals at ``rate`` items/s (0: as fast as possible); pauses between calls don't count.

    With ``drill`` (see :mod:`producers.drill`), one bad arrival goes out after every ``1 / bad_share``
    good ones; ``bad_sent`` counts them by kind.
    """

    def __init__(
        self,
        cfg: PipelineConfig,
        metrics: Metrics,
        dtypes: schemas.WireDtypes,
        rate: float,
        stop: threading.Event | None = None,
        drill: Iterator[BadArrival] | None = None,
    ) -> None:
        props: dict[str, Any] = {"linger.ms": cfg.replay.linger_ms}
        if drill is not None:
            props["message.max.bytes"] = 2 * cfg.message_max_bytes  # the oversize kind must leave the producer
        self.rt = Runtime(cfg, "replay", metrics, stop, props)
        self.dtypes = dtypes
        self.topic = cfg.topics.arrivals
        self.report = RateReport(target=rate)
        self.drill = drill
        self.every = max(1, round(1 / cfg.replay.bad_share)) if cfg.replay.bad_share > 0 else 0
        self.bad_sent: collections.Counter[str] = collections.Counter()
        self._good = 0

    def send(self, records: Sequence[ItemRecord], progress: Callable[[int], object] | None = None) -> int:
        """Produce ``records`` on schedule and wait for their acks; returns how many were sent."""
        rate = self.report.target
        start = last = time.perf_counter()
        sent = 0
        while sent < len(records) and not self.rt.stop.is_set():
            now = time.perf_counter()
            # Record i is due i / rate seconds after the start.
            due = len(records) if not rate else min(len(records), int((now - start) * rate) + 1)
            if due <= sent:
                time.sleep(min(0.005, start + sent / rate - now))
                continue
            upto = min(due, sent + 2000)
            for record in records[sent:upto]:
                value, headers = schemas.encode_arrival(record, self.dtypes)
                self.rt.produce(self.topic, value, key=str(record.item_id).encode(), headers=headers)
                self._maybe_bad()
            self.rt.producer.poll(0)
            if progress is not None:
                progress(upto - sent)
            now = time.perf_counter()
            self.report.add(upto - sent, now - last)
            sent, last = upto, now
        self.rt.flush()
        return sent

    def _maybe_bad(self) -> None:
        self._good += 1
        if self.drill is None or not self.every or self._good % self.every:
            return
        bad = next(self.drill)
        self.rt.produce(self.topic, bad.value, key=b"drill", headers=bad.headers)
        self.bad_sent[bad.kind] += 1

    def close(self) -> None:
        self.rt.producer.flush(self.rt.cfg.flush_timeout_s)


def schedule(ds: CrossModalDataset, stream: Stream, offline: bool) -> list[list[ItemRecord]]:
    """The protocol's arrivals as chunks: the offline part first (``chunk = -1``) when ``offline``."""
    chunks = [stream.chunk_records(ds, c) for c in range(len(stream.split.chunks))]
    return ([paired_records(ds, stream.split.offline, OFFLINE_CHUNK)] if offline else []) + chunks


def expected_codes(chunks: Sequence[Sequence[ItemRecord]]) -> tuple[int, int]:
    """(image, text) codes the store holds once ``chunks`` are coded: one per item and modality."""
    seen: dict[Modality, set[int]] = {m: set() for m in Modality}
    for chunk in chunks:
        for record in chunk:
            for m in record.modalities:
                seen[m].add(record.item_id)
    return len(seen[Modality.IMAGE]), len(seen[Modality.TEXT])


def wait_for_store(client: QueryClient, want: tuple[int, int], timeout_s: float) -> schemas.QueryResult:
    """Status probes until the store holds ``want`` (image, text) codes or the timeout passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = client.status(timeout_s=max(1.0, deadline - time.monotonic()))
        if all(have >= need for have, need in zip(status.store_codes, want, strict=True)):
            return status
        if time.monotonic() > deadline:
            log.warning("store holds %s codes, expected %s; scoring anyway", status.store_codes, want)
            return status
        time.sleep(0.2)


def query_groups(query_new: np.ndarray) -> dict[str, np.ndarray]:
    """The query subsets scored live: all, and for protocols with new labels those with (new) and
    without (old) one: the values of the ``queries`` label of ``fpocmh_retrieval_map``."""
    groups = {"all": np.ones(query_new.size, dtype=bool)}
    if query_new.any():
        groups |= {"new": query_new, "old": ~query_new}
    return groups


def live_map(
    client: QueryClient,
    ds: CrossModalDataset,
    query_rows: np.ndarray,
    k: int,
    batch: int,
    query_new: np.ndarray,
    timeout_s: float = 120.0,
) -> dict[str, dict[str, float]]:
    """mAP@k of the query set against the live store, I->T (image queries, text codes) and T->I, per
    query group of :func:`query_groups` (``query_new`` marks the queries with a new label)."""
    groups = query_groups(query_new)
    scores: dict[str, dict[str, float]] = {group: {} for group in groups}
    for direction, modality in (("i2t", Modality.IMAGE), ("t2i", Modality.TEXT)):
        feats = ds.image if modality is Modality.IMAGE else ds.text
        queries = [Query(feats[query_rows[i : i + batch]], modality, k) for i in range(0, query_rows.size, batch)]
        results = client.search_many(queries, timeout_s)
        width = max(r.ids.shape[1] for r in results)
        padded = [np.pad(r.ids, ((0, 0), (0, width - r.ids.shape[1])), constant_values=-1) for r in results]
        relevant = relevance_of(ds.labels, query_rows, np.concatenate(padded))
        for group, mask in groups.items():
            scores[group][direction] = evaluation.mean_average_precision_ranked(relevant[mask])
    return scores


def relevance_of(labels: np.ndarray, query_rows: np.ndarray, ranked_ids: np.ndarray) -> np.ndarray:
    """(n_q, k) bool: the ranked item shares a label with its query; padding (-1) is never relevant."""
    valid = ranked_ids >= 0
    shared = labels[np.where(valid, ranked_ids, 0)].astype(bool) & labels[query_rows][:, None, :].astype(bool)
    return shared.any(axis=2) & valid


# mAP fields of a chunk score: both directions, over all queries and (P2, P3) over the queries with and
# without a new label.
SCORE_KEYS = ("i2t", "t2i", "i2t_new", "t2i_new", "i2t_old", "t2i_old")


@dataclass(frozen=True)
class ChunkScore:
    """The live store after one chunk: what it held, the model serving it, and mAP@K both ways; for
    protocols with new labels also over the queries with (``_new``) and without (``_old``) one."""

    chunk: int
    arrivals: int
    store_codes: tuple[int, int]
    model_version: int
    i2t: float
    t2i: float
    catchup_s: float
    i2t_new: float | None = None
    t2i_new: float | None = None
    i2t_old: float | None = None
    t2i_old: float | None = None


def replay_stream(
    cfg: PipelineConfig,
    ds: CrossModalDataset,
    stream: Stream,
    metrics: Metrics,
    stop: threading.Event,
    client: QueryClient | None = None,
    progress: bool = True,
    on_chunk: Callable[[ChunkScore], object] | None = None,
) -> tuple[RateReport, list[ChunkScore]]:
    """Replay ``stream`` at ``cfg.replay.rate``; with a ``client``, score the query set after every chunk."""
    from tqdm import tqdm

    chunks = schedule(ds, stream, cfg.replay.offline)
    split = stream.split
    drill = bad_arrivals(ds, cfg.message_max_bytes) if cfg.replay.bad_share > 0 else None
    replayer = Replayer(cfg, metrics, wire_dtypes(ds), cfg.replay.rate, stop, drill)
    scores: list[ChunkScore] = []
    bar = tqdm(total=sum(map(len, chunks)), unit="item", disable=not progress, smoothing=0.1)
    try:
        for i, records in enumerate(chunks):
            bar.set_description(f"chunk {records[0].chunk}")
            replayer.send(records, bar.update)
            if stop.is_set() or client is None:
                continue
            start = time.monotonic()
            try:
                status = wait_for_store(client, expected_codes(chunks[: i + 1]), cfg.run.catchup_timeout_s)
                caught_up = time.monotonic() - start
                live = live_map(client, ds, split.query, cfg.replay.score_topk, cfg.replay.score_batch, split.query_new)
            except InterruptedError:
                break
            for group, values in live.items():
                for direction, value in values.items():
                    metrics.retrieval_map.labels(direction, group).set(value)
            subsets = {f"{d}_{group}": v for group, values in live.items() if group != "all" for d, v in values.items()}
            score = ChunkScore(
                records[0].chunk,
                len(records),
                status.store_codes,
                status.model_version,
                live["all"]["i2t"],
                live["all"]["t2i"],
                caught_up,
                **subsets,
            )
            scores.append(score)
            if on_chunk is not None:
                on_chunk(score)
    finally:
        bar.close()
        replayer.close()
    replayer.report.bad_sent = dict(replayer.bad_sent)
    return replayer.report, scores


def format_score(score: ChunkScore, k: int) -> str:
    line = (
        f"chunk {score.chunk:>2}: {score.arrivals:>5} arrivals; store {score.store_codes[0]:>5} img + "
        f"{score.store_codes[1]:>5} txt codes (caught up in {score.catchup_s:.1f} s); model v{score.model_version}; "
        f"mAP@{k} I->T {score.i2t:.4f}  T->I {score.t2i:.4f}"
    )
    if score.i2t_new is not None:
        line += (
            f"; new-label queries {score.i2t_new:.4f} / {score.t2i_new:.4f}, "
            f"others {score.i2t_old:.4f} / {score.t2i_old:.4f}"
        )
    return line
