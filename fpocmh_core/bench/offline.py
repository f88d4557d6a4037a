"""``fpocmh bench offline``: the supervised offline hash model against linear CCA with sign codes.

For each code length both are trained on the P1 offline part (or on the whole database) and evaluated
on protocol P1's queries (the file's split==1 rows) against the whole database, encoded by the
trained model: mAP over the full ranking, I->T and T->I. ``seconds`` is the training (fitting) time.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fpocmh_core import config, evaluation
from fpocmh_core.bench import report
from fpocmh_core.data import CrossModalDataset
from fpocmh_core.protocols import P1Config, P1Split
from fpocmh_core.records import Modality

if TYPE_CHECKING:
    from fpocmh_core.offline import TrainingSet

HELP = "offline supervised hashing and CCA on the P1 offline part (or all): mAP on the queries per code length"
METHODS = ("offline", "cca")
COLUMNS = ("method", "bits", "train_on", "n_train", "i2t", "t2i", "val_map", "epochs", "seconds")

Encoder = Callable[[np.ndarray, Modality], np.ndarray]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    report.add_common_arguments(parser, bits_default=(16, 32, 64, 128))
    parser.add_argument(
        "--train-on", choices=["offline", "all"], default="offline", help="the P1 offline part, or the whole database"
    )
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="methods to run")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="overrides for config/offline.yaml")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the machine is shared)")


def training_rows(split: P1Split, train_on: str) -> np.ndarray:
    """``offline``: the P1 offline part; ``all``: every database row (never a query row)."""
    if train_on not in ("offline", "all"):
        raise ValueError(f"train_on must be 'offline' or 'all', got {train_on!r}")
    return split.offline if train_on == "offline" else split.database


@dataclass(frozen=True)
class TrainingSetup:
    """The dataset, its P1 protocol and split, the rows to train on and their training set."""

    ds: CrossModalDataset
    p1: P1Config
    split: P1Split
    rows: np.ndarray
    data: TrainingSet


def training_setup(data: str | None, seed: int, train_on: str) -> TrainingSetup:
    from fpocmh_core.data import load_dataset
    from fpocmh_core.offline import TrainingSet
    from fpocmh_core.protocols import p1_split

    ds = load_dataset(data)
    p1 = config.load(P1Config, "p1", overrides={"seed": seed})
    split = p1_split(ds, p1)
    rows = training_rows(split, train_on)
    return TrainingSetup(ds, p1, split, rows, TrainingSet.from_rows(ds, rows))


def query_scores(encode: Encoder, ds: CrossModalDataset, split: P1Split) -> evaluation.CrossModalScores:
    """P1 queries against the whole database, both sides encoded by ``encode``."""
    q, db = split.query, split.database
    return evaluation.cross_modal_map(
        encode(ds.image[q], Modality.IMAGE),
        encode(ds.text[q], Modality.TEXT),
        ds.labels[q],
        encode(ds.image[db], Modality.IMAGE),
        encode(ds.text[db], Modality.TEXT),
        ds.labels[db],
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from fpocmh_core.baselines import CCAHasher
    from fpocmh_core.offline import load_offline_config, train_offline

    torch.set_num_threads(args.threads)
    setup = training_setup(args.data, args.seed, args.train_on)
    ds, p1, split, rows, data = setup.ds, setup.p1, setup.split, setup.rows, setup.data
    cfg = load_offline_config(overrides=config.parse_overrides(args.set))
    results: list[dict[str, Any]] = []
    for bits in args.bits:
        for method in args.methods:
            row: dict[str, Any] = {"method": method, "bits": bits, "train_on": args.train_on, "n_train": len(rows)}
            start = time.perf_counter()
            if method == "offline":
                res = train_offline(data, bits, cfg, progress=not args.quiet, seed=args.seed)
                encode: Encoder = res.model.encode
                row |= {"val_map": res.val_map, "epochs": res.epochs}
            else:
                encode = CCAHasher(bits).fit(data).encode
            row["seconds"] = time.perf_counter() - start
            scores = query_scores(encode, ds, split)
            row |= {"i2t": scores.i2t, "t2i": scores.t2i}
            results.append(row)
            print(
                f"[{bits} bits] {method}: I->T {scores.i2t:.4f}  T->I {scores.t2i:.4f}  ({row['seconds']:.1f}s)",
                flush=True,
            )
    print(report.format_table(results, COLUMNS))
    report.write_json(
        args.json,
        results,
        benchmark="offline",
        dataset=ds.name,
        train_on=args.train_on,
        n_query=int(split.query.size),
        n_database=int(split.database.size),
        p1=config.to_dict(p1),
        offline_config=config.to_dict(cfg),
    )
    return 0
