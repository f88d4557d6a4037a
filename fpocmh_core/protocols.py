"""Benchmark protocols, deterministic from a seed: P1 (partial-modal stream), P2 (new categories) and
P3 (new categories arriving late in a partial-modal stream).

Every protocol can be had as a stream (:func:`load_stream`): a :class:`StreamSplit` (queries, the
offline part, the chunks, which query rows carry a new label) plus how a chunk becomes arrivals
(:class:`ItemRecord`), so the same protocol drives the in-process benchmarks and the Kafka producers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar, Protocol

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

    # The config section errors name; P3 shares these keys and their checks.
    section: ClassVar[str] = "p1"

    def __post_init__(self) -> None:
        for name in ("offline_share", "unimodal_share", "label_share"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise config.ConfigError(f"{self.section}: {name} must be within [0, 1], got {value}")
        if self.n_chunks < 1:
            raise config.ConfigError(f"{self.section}: n_chunks must be >= 1, got {self.n_chunks}")


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


NEW_ITEMS = ("mixed", "alone")


@dataclass(frozen=True)
class P3Config(P1Config):
    """P1's keys, plus which labels are new and when and how their items arrive."""

    new_labels: tuple[str, ...]
    new_chunks: int
    new_items: str

    section: ClassVar[str] = "p3"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.new_labels:
            raise config.ConfigError("p3: new_labels must name at least one label")
        if not 1 <= self.new_chunks < self.n_chunks:
            raise config.ConfigError(
                f"p3: new_chunks must be >= 1 and below n_chunks ({self.n_chunks}), so that the first chunks "
                f"hold seen items only; got {self.new_chunks}"
            )
        if self.new_items not in NEW_ITEMS:
            raise config.ConfigError(f"p3: new_items must be one of {', '.join(NEW_ITEMS)}; got {self.new_items!r}")


class ArrivalShares(Protocol):
    """What turns a chunk's rows into arrivals: the seed, the unimodal share and the label share."""

    seed: int
    unimodal_share: float
    label_share: float


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
class StreamSplit:
    """A protocol as a stream: queries, database, the offline part (paired, labelled; version 0 is
    trained on it) and the chunks that stream after it. ``query_new`` marks the query rows carrying a
    label of ``new_label_columns`` (none for P1)."""

    query: np.ndarray
    database: np.ndarray
    offline: np.ndarray
    chunks: tuple[np.ndarray, ...]
    new_label_columns: tuple[int, ...]
    query_new: np.ndarray

    @property
    def has_new_labels(self) -> bool:
        return bool(self.new_label_columns)

    @property
    def online(self) -> np.ndarray:
        return np.concatenate(self.chunks) if self.chunks else np.empty(0, dtype=np.int64)

    def seen_through(self, chunk: int) -> np.ndarray:
        """Database rows that have arrived once chunk ``chunk`` (0-based) has streamed: offline first."""
        return np.concatenate([self.offline, *self.chunks[: chunk + 1]])


# The name the P1 code grew up with.
P1Split = StreamSplit


def p1_split(ds: CrossModalDataset, cfg: P1Config) -> StreamSplit:
    query, database = query_database_split(ds, cfg.seed, cfg.n_query)
    perm = _rng(cfg.seed, "p1-offline").permutation(database)
    n_off = int(round(cfg.offline_share * database.size))
    offline, online = perm[:n_off], perm[n_off:]
    chunks = tuple(np.array_split(online, cfg.n_chunks))
    no_new = np.zeros(query.size, dtype=bool)
    return StreamSplit(query, database, np.sort(offline), chunks, new_label_columns=(), query_new=no_new)


def _record(ds: CrossModalDataset, row: int, image: bool, text: bool, labelled: bool, chunk: int) -> ItemRecord:
    return ItemRecord(
        item_id=int(row),
        image=ds.image[row] if image else None,
        text=ds.text[row] if text else None,
        labels=ds.labels[row] if labelled else None,
        chunk=chunk,
    )


def p1_chunk_records(ds: CrossModalDataset, split: StreamSplit, cfg: ArrivalShares, chunk: int) -> list[ItemRecord]:
    """The arrivals of one chunk, in arrival order (P1's rule, which P3 and P2 streams share).

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


def p1_stream(ds: CrossModalDataset, split: StreamSplit, cfg: ArrivalShares) -> Iterator[list[ItemRecord]]:
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


def new_label_columns(ds: CrossModalDataset, names: tuple[str, ...], protocol: str) -> tuple[int, ...]:
    """Columns of the new labels; a name the dataset lacks is an error naming it and the dataset's labels."""
    missing = [name for name in names if name not in ds.label_names]
    if missing:
        have = ", ".join(ds.label_names) if ds.label_names else "none (the file names no labels)"
        raise DatasetError(
            f"{protocol}: new label(s) {', '.join(missing)} not in {ds.source or ds.name}; its labels: {have} "
            f"(set {protocol}.new_labels)"
        )
    return tuple(ds.label_names.index(name) for name in names)


def p2_split(ds: CrossModalDataset, cfg: P2Config) -> P2Split:
    query, database = query_database_split(ds, cfg.seed, cfg.n_query)
    new_cols = new_label_columns(ds, cfg.new_labels, "p2")
    is_new = ds.labels[database][:, list(new_cols)].any(axis=1)
    new_rows = _rng(cfg.seed, "p2-increments").permutation(database[is_new])
    return P2Split(
        query=query,
        seen=database[~is_new],
        increments=tuple(np.sort(part) for part in np.array_split(new_rows, cfg.increments)),
        new_label_columns=new_cols,
        n_labels=ds.n_labels,
    )


def _query_new(ds: CrossModalDataset, query: np.ndarray, columns: tuple[int, ...]) -> np.ndarray:
    return ds.labels[query][:, list(columns)].any(axis=1)


def p2_stream_split(ds: CrossModalDataset, cfg: P2Config) -> StreamSplit:
    """P2 as a stream: the seen database is the offline part, each increment one chunk."""
    p2 = p2_split(ds, cfg)
    return StreamSplit(
        query=p2.query,
        database=np.sort(p2.database_through(len(p2.increments) - 1)),
        offline=np.sort(p2.seen),
        chunks=p2.increments,
        new_label_columns=p2.new_label_columns,
        query_new=_query_new(ds, p2.query, p2.new_label_columns),
    )


def p3_split(ds: CrossModalDataset, cfg: P3Config) -> StreamSplit:
    """P1's shape with P2's split: the offline part and the first ``n_chunks - new_chunks`` chunks hold
    seen items only; the items carrying a new label arrive in the last ``new_chunks`` chunks, beside
    their share of the seen items (``new_items: mixed``) or on their own (``alone``).

    The offline part is ``offline_share`` of the whole database, drawn from the seen items.
    """
    query, database = query_database_split(ds, cfg.seed, cfg.n_query)
    columns = new_label_columns(ds, cfg.new_labels, "p3")
    is_new = ds.labels[database][:, list(columns)].any(axis=1)
    seen = _rng(cfg.seed, "p3-offline").permutation(database[~is_new])
    new = _rng(cfg.seed, "p3-new").permutation(database[is_new])
    n_off = int(round(cfg.offline_share * database.size))
    if n_off > seen.size:
        raise DatasetError(
            f"p3: an offline part of {n_off} items ({cfg.offline_share} of {database.size}) does not fit in the "
            f"{seen.size} items without a new label; lower p3.offline_share"
        )
    offline, online_seen = seen[:n_off], seen[n_off:]
    n_old_chunks = cfg.n_chunks - cfg.new_chunks
    seen_chunks = cfg.n_chunks if cfg.new_items == "mixed" else n_old_chunks
    seen_parts = list(np.array_split(online_seen, seen_chunks))
    seen_parts += [np.empty(0, dtype=database.dtype)] * (cfg.n_chunks - seen_chunks)
    new_parts = [np.empty(0, dtype=database.dtype)] * n_old_chunks + list(np.array_split(new, cfg.new_chunks))
    chunks = tuple(np.sort(np.concatenate([s, n])) for s, n in zip(seen_parts, new_parts, strict=True))
    return StreamSplit(
        query=query,
        database=database,
        offline=np.sort(offline),
        chunks=chunks,
        new_label_columns=columns,
        query_new=_query_new(ds, query, columns),
    )


@dataclass(frozen=True)
class PairedLabelled:
    """The arrival rule of a P2 stream: every item paired and labelled, as DLCH's increments are."""

    seed: int
    unimodal_share: float = 0.0
    label_share: float = 1.0


PROTOCOLS = ("p1", "p2", "p3")


@dataclass(frozen=True)
class Stream:
    """Any protocol as a stream: its config, its split, and the rule that turns a chunk into arrivals."""

    name: str
    config: P1Config | P2Config | P3Config
    split: StreamSplit
    arrivals: ArrivalShares

    def chunk_records(self, ds: CrossModalDataset, chunk: int) -> list[ItemRecord]:
        return p1_chunk_records(ds, self.split, self.arrivals, chunk)


def load_stream(ds: CrossModalDataset, name: str, overrides: dict | None = None) -> Stream:
    """Protocol ``name`` from ``config/<name>.yaml`` plus ``overrides``, as a stream over ``ds``."""
    if name == "p1":
        p1 = config.load(P1Config, "p1", overrides=overrides)
        return Stream(name, p1, p1_split(ds, p1), p1)
    if name == "p2":
        p2 = config.load(P2Config, "p2", overrides=overrides)
        return Stream(name, p2, p2_stream_split(ds, p2), PairedLabelled(p2.seed))
    if name == "p3":
        p3 = config.load(P3Config, "p3", overrides=overrides)
        return Stream(name, p3, p3_split(ds, p3), p3)
    raise config.ConfigError(f"unknown protocol {name!r}; known: {', '.join(PROTOCOLS)}")
