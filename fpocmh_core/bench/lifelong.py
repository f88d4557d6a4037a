"""``fpocmh bench lifelong``: protocol P2 (new categories), DLCH against its baselines in one run.

Methods, all starting from the same original-phase model trained on the seen items:
- ``dlch``: the lifelong update per increment (frozen codes, Omega sample, DCC for the new codes);
- ``retrain``: the original phase rerun from scratch on everything so far, every code recomputed;
- ``naive``: the networks fine-tuned on the increment alone with the original-phase loss (same
  epochs and learning-rate schedule as DLCH's lifelong phase), new items coded by the fine-tuned
  networks, old codes kept;
- ``frozen``: the original model, new items coded by it.
Queries are always encoded by the method's current networks and ranked against the database codes as
stored; ``*_new`` is mAP over the queries that carry a new label, ``*_old`` over the others.
With ``--seeds`` each seed has its own split, initialisation and Omega draws; the run ends with mean
and sd per cell and DLCH's differences to the baselines paired by seed, each marked whether it
exceeds 2 sd.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np

HELP = "P2 lifelong benchmark: DLCH vs full retraining, naive fine-tuning and the frozen model"
METHODS = ("dlch", "retrain", "naive", "frozen")
SCORES = ("i2t", "t2i", "i2t_new", "t2i_new", "i2t_old", "t2i_old")
COLUMNS = ("method", "bits", "seed", "increment", *SCORES, "seconds")
# Differences DLCH is judged by (see ``summary``), paired by seed: (other method, query group).
PAIRED = (("frozen", "new"), ("naive", "old"), ("retrain", ""))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fpocmh_core.bench.report import add_common_arguments

    add_common_arguments(parser, multi_seed=True)
    parser.add_argument("--protocol", choices=["p2"], default="p2", help="benchmark protocol")
    parser.add_argument("--increments", type=int, help="new items arrive in this many chunks (default: config/p2.yaml)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="methods to run")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config/dlch.yaml overrides")
    parser.add_argument("--batch", type=int, default=256, help="records per learn() call (micro-batches)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy machine)")
    parser.add_argument("--plot", type=Path, help="write mAP per increment as a PNG")


@dataclasses.dataclass
class Database:
    """Stored codes by item, in arrival order: what the query side ranks against."""

    ids: np.ndarray
    image: np.ndarray
    text: np.ndarray

    def add(self, ids: np.ndarray, image: np.ndarray, text: np.ndarray) -> Database:
        return Database(
            np.concatenate([self.ids, ids]), np.concatenate([self.image, image]), np.concatenate([self.text, text])
        )


def score(model: Any, db: Database, ds: Any, query: np.ndarray, query_new: np.ndarray) -> dict[str, float]:
    """mAP per direction over queries with / without a new label; the overall value is their weighted mean."""
    from fpocmh_core.evaluation import mean_average_precision
    from fpocmh_core.records import Modality

    q_img = model.encode(ds.image[query], Modality.IMAGE)
    q_txt = model.encode(ds.text[query], Modality.TEXT)
    q_lab, db_lab = ds.labels[query], ds.labels[db.ids]
    out: dict[str, float] = {}
    for tag, mask in (("new", query_new), ("old", ~query_new)):
        out[f"i2t_{tag}"] = mean_average_precision(q_img[mask], db.text, q_lab[mask], db_lab)
        out[f"t2i_{tag}"] = mean_average_precision(q_txt[mask], db.image, q_lab[mask], db_lab)
    share = float(query_new.mean())
    for d in ("i2t", "t2i"):
        out[d] = share * out[f"{d}_new"] + (1 - share) * out[f"{d}_old"]
    return out


def naive_fine_tune(learner: Any, ds: Any, rows: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Fine-tune on the increment alone with the original-phase loss; returns the new items' codes."""
    from fpocmh_core.learners.dlch_train import train_original
    from fpocmh_core.records import Modality

    life = learner.cfg.lifelong
    schedule = dataclasses.replace(
        learner.cfg.original, lr=life.lr, lr_end=life.lr * life.decay ** max(life.epochs - 1, 0), epochs=life.epochs
    )
    train_original(learner.model, learner.label_net, ds.image[rows], ds.text[rows], ds.labels[rows], schedule, seed)
    return learner.encode(ds.image[rows], Modality.IMAGE), learner.encode(ds.text[rows], Modality.TEXT)


def dlch_increment(learner: Any, records: list, batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stream the increment through ``learn`` in micro-batches, close it, and collect the codes it wrote."""
    from fpocmh_core.learners.base import LearnReport
    from fpocmh_core.learners.dlch import merge_reports
    from fpocmh_core.records import Modality

    report = LearnReport()
    for i in range(0, len(records), batch):
        merge_reports(report, learner.learn(records[i : i + batch]))
    merge_reports(report, learner.finish_increment())
    by_item: dict[int, dict[Modality, np.ndarray]] = {}
    for rec in report.codes:
        by_item.setdefault(rec.item_id, {})[rec.modality] = rec.code
    ids = np.array([r.item_id for r in records], np.int64)
    if set(by_item) != set(ids.tolist()):
        raise RuntimeError(f"dlch wrote codes for {len(by_item)} items, the increment has {ids.size}")
    image = np.stack([by_item[i][Modality.IMAGE] for i in ids.tolist()])
    text = np.stack([by_item[i][Modality.TEXT] for i in ids.tolist()])
    return ids, image, text


def run_bits(
    args: argparse.Namespace, ds: Any, split: Any, bits: int, seed: int, overrides: dict[str, Any]
) -> list[dict]:
    from fpocmh_core.learners.dlch import DlchLearner
    from fpocmh_core.protocols import paired_records
    from fpocmh_core.records import Modality

    query = split.query
    query_new = ds.labels[query][:, list(split.new_label_columns)].any(axis=1)
    progress = not args.quiet
    started = time.perf_counter()
    base = DlchLearner.bootstrap(ds, split.seen, bits, overrides, progress=progress)
    boot_seconds = time.perf_counter() - started
    ids, img, txt = base.frozen_codes()
    original_db = Database(ids, img, txt)
    rows = [{"method": "original", "bits": bits, "seed": seed, "increment": 0, "seconds": boot_seconds}]
    rows[0].update(score(base.model, original_db, ds, query, query_new))
    learners = {m: copy.deepcopy(base) for m in ("dlch", "naive") if m in args.methods}
    dbs = {m: original_db for m in args.methods}
    for k, inc_rows in enumerate(split.increments, start=1):
        for method in args.methods:
            started = time.perf_counter()
            if method == "dlch":
                model = learners["dlch"].model
                before = learners["dlch"].frozen_codes()
                dbs[method] = dbs[method].add(
                    *dlch_increment(learners["dlch"], paired_records(ds, inc_rows, k - 1), args.batch)
                )
                seconds = time.perf_counter() - started
                after = learners["dlch"].frozen_codes()
                if not all(np.array_equal(a[: b.shape[0]], b) for a, b in zip(after, before, strict=True)):
                    raise RuntimeError("dlch changed a frozen code")
            elif method == "naive":
                model = learners["naive"].model
                new_img, new_txt = naive_fine_tune(learners["naive"], ds, inc_rows, base.cfg.seed + k)
                seconds = time.perf_counter() - started
                dbs[method] = dbs[method].add(inc_rows, new_img, new_txt)
            elif method == "frozen":
                model = base.model
                new_img, new_txt = (
                    model.encode(ds.image[inc_rows], Modality.IMAGE),
                    model.encode(ds.text[inc_rows], Modality.TEXT),
                )
                seconds = time.perf_counter() - started
                dbs[method] = dbs[method].add(inc_rows, new_img, new_txt)
            else:
                retrained = DlchLearner.bootstrap(ds, split.database_through(k - 1), bits, overrides, progress=progress)
                seconds = time.perf_counter() - started
                model = retrained.model
                dbs[method] = Database(*retrained.frozen_codes())
            row = {"method": method, "bits": bits, "seed": seed, "increment": k, "seconds": seconds}
            row.update(score(model, dbs[method], ds, query, query_new))
            rows.append(row)
            if progress:
                print(
                    f"bits {bits} increment {k}/{len(split.increments)} {method}: "
                    f"i2t {row['i2t']:.4f} t2i {row['t2i']:.4f} in {seconds:.1f} s",
                    flush=True,
                )
    return rows


def summary(rows: list[dict]) -> list[str]:
    """DLCH against the targets: time and mAP relative to retraining, forgetting vs naive, new vs frozen."""
    lines = []
    by = {(r["method"], r["bits"], r["seed"], r["increment"]): r for r in rows}
    for (method, bits, seed, inc), r in sorted(by.items(), key=lambda kv: kv[0][1:]):
        if method != "dlch":
            continue
        parts = [f"bits {bits} seed {seed} increment {inc}: dlch"]
        if (ret := by.get(("retrain", bits, seed, inc))) is not None:
            parts.append(
                f"time {100 * r['seconds'] / ret['seconds']:.1f}% of retrain, "
                f"mAP {100 * r['i2t'] / ret['i2t']:.1f}% / {100 * r['t2i'] / ret['t2i']:.1f}% of retrain (i2t / t2i)"
            )
        if (nai := by.get(("naive", bits, seed, inc))) is not None:
            parts.append(
                f"old-query mAP - naive {r['i2t_old'] - nai['i2t_old']:+.4f} / {r['t2i_old'] - nai['t2i_old']:+.4f}"
            )
        if (fro := by.get(("frozen", bits, seed, inc))) is not None:
            parts.append(
                f"new-query mAP - frozen {r['i2t_new'] - fro['i2t_new']:+.4f} / {r['t2i_new'] - fro['t2i_new']:+.4f}"
            )
        lines.append("; ".join(parts))
    return lines


def plot(rows: list[dict], path: Path) -> None:
    """mAP per increment, one line per method and code length (``rows`` of one seed, or means over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("i2t", "t2i", "i2t_old", "t2i_old", "i2t_new", "t2i_new")
    fig, axes = plt.subplots(3, 2, figsize=(10, 11), sharex=True)
    for ax, key in zip(axes.flat, keys, strict=True):
        for bits in sorted({r["bits"] for r in rows}):
            start = next(r for r in rows if r["method"] == "original" and r["bits"] == bits)
            for method in METHODS:
                mine = [r for r in rows if r["method"] == method and r["bits"] == bits]
                if mine:
                    xs = [0] + [r["increment"] for r in mine]
                    ax.plot(xs, [start[key]] + [r[key] for r in mine], marker="o", label=f"{method} {bits}b")
        ax.set_title(key)
        ax.set_ylabel("mAP")
    for ax in axes[-1]:
        ax.set_xlabel("increment (0 = original phase)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def over_seeds(rows: list[dict], seeds: list[int]) -> tuple[list[dict], list[str]]:
    """Mean and sd per method, code length and increment, and DLCH's differences paired by seed (each
    marked whether it exceeds 2 sd): to the frozen model on new-label queries, to naive fine-tuning on
    the others, and to full retraining on all queries."""
    from fpocmh_core.bench.report import aggregate, format_mean_sd, format_table, paired_difference

    cells = aggregate(rows, ("method", "bits", "increment"), (*SCORES, "seconds"))
    shown = [{**c, **{v: format_mean_sd(c, v) for v in (*SCORES, "seconds")}} for c in cells]
    lines = [f"mean ± sd over seeds {seeds}:", format_table(shown, ("method", "bits", "increment", "runs", *SCORES))]
    methods = {r["method"] for r in rows}
    for bits, inc in dict.fromkeys((r["bits"], r["increment"]) for r in rows if r["method"] == "dlch"):
        mine = [r for r in rows if r["bits"] == bits and r["increment"] == inc]
        for other, group in PAIRED:
            if other not in methods:
                continue
            keys = [f"{d}_{group}" if group else d for d in ("i2t", "t2i")]
            diffs = [paired_difference(mine, "method", "dlch", other, ("seed",), key) for key in keys]
            queries = f"{group}-label queries" if group else "all queries"
            lines.append(f"bits {bits} increment {inc}: dlch - {other} on {queries}: I->T {diffs[0]}, T->I {diffs[1]}")
    return cells, lines


def run(args: argparse.Namespace) -> int:
    import torch

    from fpocmh_core import config
    from fpocmh_core.bench.report import dataset, format_table, seeds, write_json
    from fpocmh_core.learners.dlch_train import DlchConfig
    from fpocmh_core.protocols import P2Config, p2_split

    torch.set_num_threads(args.threads)
    ds = dataset(args)
    runs = seeds(args)
    rows: list[dict] = []
    for seed in runs:
        p2_overrides: dict[str, Any] = {"seed": seed}
        if args.increments is not None:
            p2_overrides["increments"] = args.increments
        p2 = config.load(P2Config, "p2", overrides=p2_overrides)
        overrides = {**config.parse_overrides(args.set), "seed": seed}
        split = p2_split(ds, p2)
        if not args.quiet:
            sizes = ", ".join(str(len(r)) for r in split.increments)
            print(
                f"P2 on {ds.name}, seed {seed}: {len(split.query)} queries, {len(split.seen)} seen items, "
                f"increments of {sizes}"
            )
        for bits in args.bits:
            rows.extend(run_bits(args, ds, split, bits, seed, overrides))
    print(format_table(rows, COLUMNS))
    for line in summary(rows):
        print(line)
    extra: dict[str, Any] = {}
    cells = rows
    if len(runs) > 1:
        cells, lines = over_seeds(rows, runs)
        print("\n" + "\n".join(lines))
        extra = {"over_seeds": cells, "paired_differences": lines}
    dlch_cfg = config.load(DlchConfig, "dlch", overrides=overrides)
    write_json(
        args.json,
        rows,
        protocol={**config.to_dict(p2), "seed": runs if len(runs) > 1 else runs[0]},
        dlch=config.to_dict(dlch_cfg),
        split={"query": len(split.query), "seen": len(split.seen), "increments": [len(r) for r in split.increments]},
        summary=summary(rows),
        **extra,
    )
    if args.plot is not None:
        plot(cells, args.plot)  # the mean over seeds, when there are several
    return 0
