"""Benchmark protocols P1 (partial-modal stream) and P2 (new categories), deterministic from a seed.

Both produce index splits over a :class:`CrossModalDataset` and iterators of :class:`ItemRecord`, so
the same protocol drives the in-process benchmarks and the Kafka producers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from fpocmh_core import config
from fpocmh_core.data import CrossModalDataset, DatasetError
from fpocmh_core.records import ItemRecord


@dataclass(frozen=True)
class P1Config:
    seed: int
    n_query: int
    offline_share: float
    n_chunks: int
    unimodal_share: float
    label_share: float

    def __post_init__(self) -> None:
        for name in ("offline_share", "unimodal_share", "label_share"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise config.ConfigError(f"p1: {name} must be within [0, 1], got {value}")
        if self.n_chunks < 1:
            raise config.ConfigError(f"p1: n_chunks must be >= 1, got {self.n_chunks}")


@dataclass(frozen=True)
class P2Config:
    seed: int
    n_query: int
    new_labels: tuple[str, ...]
    increments: int

    def __post_init__(self) -> None:
        if self.increments < 1:
            raise config.ConfigError(f"p2: increments must be >= 1, got {self.increments}")
        if not self.new_labels:
            raise config.ConfigError("p2: new_labels must name at least one label")


def _rng(seed: int, purpose: str) -> np.random.Generator:
    """One independent generator per purpose, so changing one share never reshuffles another."""
    return np.random.default_rng([seed, *purpose.encode()])


def query_database_split(ds: CrossModalDataset, seed: int, n_query: int) -> tuple[np.ndarray, np.ndarray]:
    """Query rows from the file's split column when present, else ``n_query`` random rows."""
    if ds.split is not None:
        query = np.flatnonzero(ds.split == 1)
        database = np.flatnonzero(ds.split == 0)
        if query.size == 0:
            raise DatasetError(f"{ds.source}: split has no query rows (value 1)")
        return query, database
    if not 0 < n_query < len(ds):
        raise DatasetError(f"{ds.source}: n_query={n_query} must be between 1 and {len(ds) - 1}")
    perm = _rng(seed, "query").permutation(len(ds))
    return np.sort(perm[:n_query]), np.sort(perm[n_query:])


@dataclass(frozen=True)
class P1Split:
    query: np.ndarray
    database: np.ndarray
    offline: np.ndarray
    chunks: tuple[np.ndarray, ...]

    @property
    def online(self) -> np.ndarray:
        return np.concatenate(self.chunks) if self.chunks else np.empty(0, dtype=np.int64)

    def seen_through(self, chunk: int) -> np.ndarray:
        """Database rows that have arrived once chunk ``chunk`` (0-based) has streamed: offline first."""
        return np.concatenate([self.offline, *self.chunks[: chunk + 1]])


def p1_split(ds: CrossModalDataset, cfg: P1Config) -> P1Split:
    query, database = query_database_split(ds, cfg.seed, cfg.n_query)
    perm = _rng(cfg.seed, "p1-offline").permutation(database)
    n_off = int(round(cfg.offline_share * database.size))
    offline, online = perm[:n_off], perm[n_off:]
    chunks = tuple(np.array_split(online, cfg.n_chunks))
    return P1Split(query=query, database=database, offline=np.sort(offline), chunks=chunks)


def _record(ds: CrossModalDataset, row: int, image: bool, text: bool, labelled: bool, chunk: int) -> ItemRecord:
    return ItemRecord(
        item_id=int(row),
        image=ds.image[row] if image else None,
        text=ds.text[row] if text else None,
        labels=ds.labels[row] if labelled else None,
        chunk=chunk,
    )


def p1_chunk_records(ds: CrossModalDataset, split: P1Split, cfg: P1Config, chunk: int) -> list[ItemRecord]:
    """The arrivals of one chunk, in arrival order.

    A ``unimodal_share`` of the chunk's pairs is split into an image-only and a text-only item; all
    items are then shuffled, so an image and its own text arrive at unrelated times (as in the
    FPO-CMH code at share 1.0). Each item carries its labels with probability ``label_share``.
    """
    rows = split.chunks[chunk]
    # The chunk goes into the purpose, not the seed: seed s, chunk c+1 must not replay seed s+1, chunk c.
    rng = _rng(cfg.seed, f"p1-chunk-{chunk}")
    n_split = int(round(cfg.unimodal_share * rows.size))
    split_mask = np.zeros(rows.size, dtype=bool)
    split_mask[rng.permutation(rows.size)[:n_split]] = True
    # (row, has image, has text) for every arrival
    items = [(r, True, False) for r in rows[split_mask]]
    items += [(r, False, True) for r in rows[split_mask]]
    items += [(r, True, True) for r in rows[~split_mask]]
    order = rng.permutation(len(items))
    n_lab = int(round(cfg.label_share * len(items)))
    labelled = np.zeros(len(items), dtype=bool)
    labelled[rng.permutation(len(items))[:n_lab]] = True
    return [_record(ds, *items[i], labelled=bool(labelled[k]), chunk=chunk) for k, i in enumerate(order)]


def p1_stream(ds: CrossModalDataset, split: P1Split, cfg: P1Config) -> Iterator[list[ItemRecord]]:
    """Chunk after chunk of arrivals."""
    for chunk in range(len(split.chunks)):
        yield p1_chunk_records(ds, split, cfg, chunk)


def paired_records(ds: CrossModalDataset, rows: np.ndarray, chunk: int = 0) -> list[ItemRecord]:
    """Fully paired, labelled arrivals (the offline part, or a DLCH increment)."""
    return [_record(ds, r, True, True, True, chunk) for r in rows]


@dataclass(frozen=True)
class P2Split:
    query: np.ndarray
    seen: np.ndarray
    increments: tuple[np.ndarray, ...]
    new_label_columns: tuple[int, ...]
    n_labels: int

    @property
    def seen_label_columns(self) -> np.ndarray:
        return np.setdiff1d(np.arange(self.n_labels), self.new_label_columns)

    def database_through(self, increment: int) -> np.ndarray:
        """Database rows once increment ``increment`` (0-based; -1 = original phase) has arrived."""
        return np.concatenate([self.seen, *self.increments[: increment + 1]])


def p2_split(ds: CrossModalDataset, cfg: P2Config) -> P2Split:
    query, database = query_database_split(ds, cfg.seed, cfg.n_query)
    new_cols = tuple(ds.label_index(name) for name in cfg.new_labels)
    is_new = ds.labels[database][:, list(new_cols)].any(axis=1)
    new_rows = _rng(cfg.seed, "p2-increments").permutation(database[is_new])
    return P2Split(
        query=query,
        seen=database[~is_new],
        increments=tuple(np.sort(part) for part in np.array_split(new_rows, cfg.increments)),
        new_label_columns=new_cols,
        n_labels=ds.n_labels,
    )
