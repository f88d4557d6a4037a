"""The floor under ``bench query``'s shard ratios on this host: the same probes answered by bare
scanning processes, with no broker, client or role between.

Each layout of ``S`` shards gets ``S`` processes, each holding one shard's codes in a
:class:`~fpocmh_core.hamming.FlatIndex` (as a shard holds them) and answering a packed query code sent
over a pipe with its exact top-k; a layout's round trip waits for all its processes. ``bench query``
sends every probe to a layout's bare processes right after its shard roles answered it, so both meet
the same moment of the host. Two shards' p99 over one shard's here is the best that any tier of
separate shard processes reaches on this host: what is left above it is the broker's and the roles'.
"""

from __future__ import annotations

import multiprocessing
import tempfile
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

READY = b"ready"
DONE = b"."
STOP = b""


def interleaved(order: list[int], probes: int) -> Iterator[tuple[int, int]]:
    """(probe, layout) pairs: probe i goes to every layout in turn, starting one layout further each
    time, so a stretch of the host's noise falls on every layout alike."""
    for i in range(probes):
        for n in order[i % len(order) :] + order[: i % len(order)]:
            yield i, n


def round_percentiles(rounds: list[list[float]]) -> list[tuple[float, float]]:
    """(p50, p99) in ms of each round's round trips (seconds)."""
    out = []
    for seconds in rounds:
        p50, p99 = np.percentile(1e3 * np.asarray(seconds), [50, 99])
        out.append((float(p50), float(p99)))
    return out


def shard_masks(ids: np.ndarray, partitions: list[int], shards: int) -> list[np.ndarray]:
    """Per shard of ``shards``: the rows whose item lives in one of its partitions, items spread
    round-robin over ``partitions`` as ``bench query`` produces them."""
    from consumers.query.shards import ShardSpec

    partition_of = np.asarray(partitions)[ids % len(partitions)]
    return [np.isin(partition_of, ShardSpec(s, shards).owns(partitions)) for s in range(shards)]


def _serve_scans(conn: Connection, base: str, bits: int, k: int) -> None:
    """A bare shard: load its codes, then search each query code it is sent and say when it is done."""
    import faiss

    from fpocmh_core.hamming import FlatIndex

    faiss.omp_set_num_threads(1)  # as the query role sets it
    store = FlatIndex(bits)
    store.load(np.load(f"{base}.ids.npy", allow_pickle=False), np.load(f"{base}.codes.npy", allow_pickle=False))
    conn.send_bytes(READY)
    while (query := conn.recv_bytes()) != STOP:
        store.search(np.frombuffer(query, np.uint8).reshape(1, -1), k)
        conn.send_bytes(DONE)


class BareLayouts:
    """Bare shard processes for every shard count in ``counts``, each holding its shard's codes
    (started on ``__enter__``, stopped on ``__exit__``)."""

    def __init__(
        self, ids: np.ndarray, codes: np.ndarray, partitions: list[int], counts: list[int], k: int = 100
    ) -> None:
        self._data = (ids, codes, partitions)
        self.counts = sorted(counts)
        self.k = k
        self.layouts: dict[int, list[Connection]] = {}
        self.workers: list[multiprocessing.process.BaseProcess] = []
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> BareLayouts:
        ids, codes, partitions = self._data
        ctx = multiprocessing.get_context("spawn")  # never fork a process that holds Kafka clients' threads
        self._tmp = tempfile.TemporaryDirectory(prefix="fpocmh-floor-")
        try:
            for n in self.counts:
                self.layouts[n] = []
                for s, mine in enumerate(shard_masks(ids, partitions, n)):
                    base = str(Path(self._tmp.name) / f"{n}-{s}")
                    np.save(f"{base}.ids.npy", ids[mine])
                    np.save(f"{base}.codes.npy", codes[mine])
                    ours, theirs = ctx.Pipe()
                    worker = ctx.Process(target=_serve_scans, args=(theirs, base, codes.shape[1] * 8, self.k))
                    worker.daemon = True
                    worker.start()
                    theirs.close()
                    self.workers.append(worker)
                    self.layouts[n].append(ours)
            for conns in self.layouts.values():
                for conn in conns:
                    if conn.recv_bytes() != READY:
                        raise RuntimeError("a bare shard process did not start")
        except BaseException:
            self.__exit__()
            raise
        return self

    def round_trip(self, shards: int, code: np.ndarray) -> float:
        """Seconds until every process of the ``shards`` layout has searched the packed ``code``."""
        query = np.ascontiguousarray(code, np.uint8).tobytes()
        start = time.perf_counter()
        for conn in self.layouts[shards]:
            conn.send_bytes(query)
        for conn in self.layouts[shards]:
            conn.recv_bytes()
        return time.perf_counter() - start

    def __exit__(self, *exc: object) -> None:
        for conns in self.layouts.values():
            for conn in conns:
                try:
                    conn.send_bytes(STOP)
                except OSError:
                    pass
        for worker in self.workers:
            worker.join(10)
            if worker.is_alive():
                worker.kill()
        if self._tmp is not None:
            self._tmp.cleanup()
