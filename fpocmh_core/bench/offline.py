"""``fpocmh bench offline``: the supervised offline hash model against linear CCA with sign codes.

For each code length both are trained on the P1 offline part (or on the whole database) and evaluated
on protocol P1's queries (the file's split==1 rows) against the whole database, encoded by the
trained model: mAP over the full ranking, I->T and T->I. ``seconds`` is the training (fitting) time.
With ``--seeds`` every seed has its own split and initialisation, and the table ends with mean and
sd per cell. CCA at a code length beyond its canonical directions is reported as not applicable, with
the reason; the hash model runs at any length.
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
COLUMNS = ("method", "bits", "seed", "train_on", "n_train", "i2t", "t2i", "val_map", "epochs", "seconds")
# What is averaged over seeds (--seeds).
SEED_VALUES = ("i2t", "t2i", "seconds")

Encoder = Callable[[np.ndarray, Modality], np.ndarray]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    report.add_common_arguments(parser, bits_default=(16, 32, 64, 128), multi_seed=True)
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


def run_method(method: str, bits: int, seed: int, setup: TrainingSetup, cfg: Any, progress: bool) -> dict[str, Any]:
    """One method at one code length on one seed's setup: its row, or why it is not applicable."""
    from fpocmh_core.baselines import CCAHasher
    from fpocmh_core.offline import train_offline

    data = setup.data
    row: dict[str, Any] = {"method": method, "bits": bits, "seed": seed, "n_train": len(setup.rows)}
    if method == "cca":
        reason = CCAHasher.not_applicable(bits, *setup.ds.dims, len(data.pairs) if data.pairs is not None else 0)
        if reason is not None:
            print(f"[{bits} bits] cca: not applicable: {reason}", flush=True)
            return row | {"not_applicable": reason}
    start = time.perf_counter()
    if method == "offline":
        res = train_offline(data, bits, cfg, progress=progress, seed=seed)
        encode: Encoder = res.model.encode
        row |= {"val_map": res.val_map, "epochs": res.epochs}
    else:
        encode = CCAHasher(bits).fit(data).encode
    row["seconds"] = time.perf_counter() - start
    scores = query_scores(encode, setup.ds, setup.split)
    row |= {"i2t": scores.i2t, "t2i": scores.t2i}
    print(f"[{bits} bits] {method}: I->T {scores.i2t:.4f}  T->I {scores.t2i:.4f}  ({row['seconds']:.1f}s)", flush=True)
    return row


def seed_table(results: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """Mean and sd over seeds per method and code length (methods that ran), and that table as text."""
    ran = [r for r in results if "not_applicable" not in r]
    cells = report.aggregate(ran, ("method", "bits"), SEED_VALUES)
    rows = [{**c, **{v: report.format_mean_sd(c, v) for v in SEED_VALUES}} for c in cells]
    return cells, report.format_table(rows, ("method", "bits", "runs", *SEED_VALUES))


def run(args: argparse.Namespace) -> int:
    import torch

    from fpocmh_core.offline import load_offline_config

    torch.set_num_threads(args.threads)
    cfg = load_offline_config(overrides=config.parse_overrides(args.set))
    seeds = report.seeds(args)
    results: list[dict[str, Any]] = []
    for seed in seeds:
        setup = training_setup(args.data, seed, args.train_on)
        for bits in args.bits:
            for method in args.methods:
                row = run_method(method, bits, seed, setup, cfg, not args.quiet)
                results.append({**row, "train_on": args.train_on})
    print(report.format_table(results, COLUMNS))
    for method, bits, reason in dict.fromkeys((r["method"], r["bits"], r.get("not_applicable")) for r in results):
        if reason is not None:
            print(f"{method} at {bits} bits: not applicable: {reason}")
    extra: dict[str, Any] = {}
    if len(seeds) > 1:
        cells, table = seed_table(results)
        print(f"\nmean ± sd over seeds {seeds}:\n{table}")
        extra["over_seeds"] = cells
    p1 = config.to_dict(setup.p1)
    report.write_json(
        args.json,
        results,
        benchmark="offline",
        dataset=setup.ds.name,
        train_on=args.train_on,
        n_query=int(setup.split.query.size),
        n_database=int(setup.split.database.size),
        p1={**p1, "seed": seeds if len(seeds) > 1 else seeds[0]},
        offline_config=config.to_dict(cfg),
        **extra,
    )
    return 0
