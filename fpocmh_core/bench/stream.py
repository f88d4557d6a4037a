"""``fpocmh bench stream``: protocol P1 (partial-modal stream) in process, every method side by side.

Methods, all on the same split, features and bits:
- ``frozen``: the offline model, never updated;
- ``naive``: the offline model fine-tuned online (no bank, no rehearsal);
- ``retrain``: after every chunk, full retraining from scratch on the offline part plus every stream
  item seen so far that carried its labels;
- ``cca``: linear CCA with sign codes, fitted on the offline part, never updated;
- ``fpocmh``: the FPO-CMH learner.

Database codes are stored as they were made: offline rows by the offline model before the stream, each
stream item's image (text) code by the model of the moment its image (text) arrived. After each chunk,
queries (always from the current model) are ranked against the stored codes and against the database
re-hashed by the current model; drift is the share of stored bits that a re-hash would change.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fpocmh_core import codes, config, evaluation
from fpocmh_core.bench import report
from fpocmh_core.data import CrossModalDataset, load_dataset
from fpocmh_core.learners.base import OnlineLearner
from fpocmh_core.nets import HashModel
from fpocmh_core.protocols import P1Config, P1Split, p1_chunk_records, p1_split
from fpocmh_core.records import ItemRecord, Modality

HELP = "P1 partial-modal stream: frozen, naive, retrain, CCA and FPO-CMH side by side, mAP after every chunk"
METHODS = ("frozen", "naive", "retrain", "cca", "fpocmh")
COLUMNS = ("method", "chunk", "i2t", "t2i", "i2t_rehashed", "t2i_rehashed", "drift", "seconds", "ms_per_item")
IMG, TXT = Modality.IMAGE, Modality.TEXT
PLOTTED = ("i2t", "t2i", "i2t_rehashed", "t2i_rehashed")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    report.add_common_arguments(parser, multi_seed=True)
    parser.add_argument("--protocol", choices=["p1"], default="p1", help="stream protocol (config/p1.yaml)")
    parser.add_argument(
        "--offline-share", type=float, help="share of the database that is offline (p1 offline_share; default 0.3)"
    )
    parser.add_argument("--unimodal-share", type=float, help="share of stream pairs split into unimodal items")
    parser.add_argument("--label-share", type=float, help="share of stream items that carry their labels")
    parser.add_argument("--chunks", type=int, help="number of stream chunks (p1 n_chunks)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="methods to run")
    parser.add_argument("--plot", type=Path, help="write the stored-code mAP curves to this PNG")
    parser.add_argument("--batch", type=int, default=256, help="micro-batch size handed to the learners")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    for name in ("fpocmh", "naive", "offline"):
        parser.add_argument(
            f"--{name}-set", nargs="+", default=[], metavar="KEY=VALUE", help=f"overrides for config/{name}.yaml"
        )


@dataclass
class Arm:
    """One method in the run: how it encodes now, how it learns, and the codes it has stored."""

    name: str
    encode: Callable[[np.ndarray, Modality], np.ndarray]
    learn: Callable[[list[ItemRecord]], object] | None = None
    static: bool = False  # the model never changes, so re-hashing gives the stored codes back
    stored: dict[Modality, np.ndarray] = field(default_factory=dict)
    seconds: float = 0.0


def _arm_from_learner(name: str, learner: OnlineLearner) -> Arm:
    return Arm(name, learner.encode, learner.learn)


def _arm_from_model(name: str, model: HashModel) -> Arm:
    return Arm(name, model.encode, static=True)


class Retrainer:
    """Full retraining from scratch after each chunk on everything seen so far (labelled items only)."""

    def __init__(self, ds: CrossModalDataset, split: P1Split, bits: int, off_cfg: Any, seed: int, model: HashModel):
        self.ds, self.split, self.bits, self.off_cfg, self.seed = ds, split, bits, off_cfg, seed
        self.model = model
        self.images: list[int] = []
        self.texts: list[int] = []
        self.trained_on = (0, 0)

    def encode(self, x: np.ndarray, modality: Modality) -> np.ndarray:
        return self.model.encode(x, modality)

    def collect(self, batch: list[ItemRecord]) -> None:
        for rec in batch:
            if rec.labels is None:
                continue
            if rec.image is not None:
                self.images.append(rec.item_id)
            if rec.text is not None:
                self.texts.append(rec.item_id)

    def retrain(self) -> float:
        """Seconds spent; 0 when nothing new carried labels (the result would be the same model)."""
        from fpocmh_core.offline import TrainingSet, train_offline

        if (len(self.images), len(self.texts)) == self.trained_on:
            return 0.0
        start = time.perf_counter()
        # The offline pairs, then every labelled stream image and text (unpaired: labels relate them).
        off = self.split.offline
        images = np.concatenate([off, np.asarray(self.images, dtype=np.int64)])
        texts = np.concatenate([off, np.asarray(self.texts, dtype=np.int64)])
        pairs = np.stack([np.arange(off.size)] * 2, axis=1)
        ds = self.ds
        data = TrainingSet(ds.image[images], ds.labels[images], ds.text[texts], ds.labels[texts], pairs)
        self.model = train_offline(data, self.bits, self.off_cfg, progress=False, seed=self.seed).model
        self.trained_on = (len(self.images), len(self.texts))
        return time.perf_counter() - start


def _p1_config(args: argparse.Namespace, seed: int) -> P1Config:
    overrides: dict[str, Any] = {"seed": seed}
    flags = ("offline_share", "offline_share"), ("unimodal_share", "unimodal_share"), ("label_share", "label_share")
    for flag, key in (*flags, ("chunks", "n_chunks")):
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    return config.load(P1Config, "p1", overrides=overrides)


def _evaluate(arm: Arm, ds: CrossModalDataset, split: P1Split, rows: np.ndarray) -> dict[str, float]:
    q = split.query
    q_img, q_txt = arm.encode(ds.image[q], IMG), arm.encode(ds.text[q], TXT)
    st_img, st_txt = arm.stored[IMG][rows], arm.stored[TXT][rows]

    def maps(db_img: np.ndarray, db_txt: np.ndarray) -> evaluation.CrossModalScores:
        return evaluation.cross_modal_map(q_img, q_txt, ds.labels[q], db_img, db_txt, ds.labels[rows])

    stored = maps(st_img, st_txt)
    if arm.static:
        rehashed, drift = stored, 0.0
    else:
        re_img, re_txt = arm.encode(ds.image[rows], IMG), arm.encode(ds.text[rows], TXT)
        rehashed = maps(re_img, re_txt)
        drift = codes.bit_drift(np.vstack([st_img, st_txt]), np.vstack([re_img, re_txt]))
    return {
        "i2t": stored.i2t,
        "t2i": stored.t2i,
        "i2t_rehashed": rehashed.i2t,
        "t2i_rehashed": rehashed.t2i,
        "drift": drift,
    }


def _store(arm: Arm, batch: list[ItemRecord]) -> None:
    """What the encoder does on arrival: hash each present modality with the model of this moment."""
    for m in (IMG, TXT):
        recs = [r for r in batch if r.features(m) is not None]
        if recs:
            x = np.stack([r.features(m) for r in recs])
            arm.stored[m][[r.item_id for r in recs]] = arm.encode(x, m)


def run_bits(args: argparse.Namespace, ds: CrossModalDataset, p1: P1Config, bits: int) -> list[dict[str, Any]]:
    """One run of every method on one seed's stream (``p1.seed`` seeds the split, the models and the order)."""
    from fpocmh_core.baselines import CCAHasher
    from fpocmh_core.learners.fpocmh import FpocmhLearner
    from fpocmh_core.learners.fpocmh import load_config as load_fpocmh_config
    from fpocmh_core.learners.naive import NaiveLearner
    from fpocmh_core.learners.naive import load_config as load_naive_config
    from fpocmh_core.offline import TrainingSet, load_offline_config, train_offline

    seed = p1.seed
    split = p1_split(ds, p1)
    off_cfg = load_offline_config(overrides=config.parse_overrides(args.offline_set))
    start = time.perf_counter()
    offline = train_offline(TrainingSet.from_rows(ds, split.offline), bits, off_cfg, progress=not args.quiet, seed=seed)
    print(
        f"[{bits} bits, seed {seed}] offline model on {split.offline.size} pairs: {time.perf_counter() - start:.1f}s, "
        f"validation mAP {offline.val_map}",
        flush=True,
    )
    model0 = offline.model
    arms: dict[str, Arm] = {}
    retrainer = None
    for name in args.methods:
        if name == "frozen":
            arms[name] = _arm_from_model(name, model0)
        elif name == "cca":
            cca = CCAHasher(bits).fit(ds.image[split.offline], ds.text[split.offline])
            arms[name] = Arm(name, cca.encode, static=True)
        elif name == "naive":
            cfg = load_naive_config(overrides={"seed": seed, **config.parse_overrides(args.naive_set)})
            arms[name] = _arm_from_learner(name, NaiveLearner(copy.deepcopy(model0), cfg))
        elif name == "fpocmh":
            cfg = load_fpocmh_config(overrides={"seed": seed, **config.parse_overrides(args.fpocmh_set)})
            learner = FpocmhLearner.from_offline(copy.deepcopy(model0), ds, split.offline, cfg)
            arms[name] = _arm_from_learner(name, learner)
            print(
                f"[{bits} bits, seed {seed}] fpocmh: {learner.space}-space form, {len(learner.bank)} bank rows",
                flush=True,
            )
        elif name == "retrain":
            retrainer = Retrainer(ds, split, bits, off_cfg, seed, copy.deepcopy(model0))
            arms[name] = Arm(name, retrainer.encode, retrainer.collect)
    for arm in arms.values():
        arm.stored = {m: np.zeros((len(ds), bits // 8), np.uint8) for m in (IMG, TXT)}
        _store(arm, [ItemRecord(int(r), ds.image[r], ds.text[r]) for r in split.offline])

    results: list[dict[str, Any]] = []
    base = {
        "bits": bits,
        "seed": seed,
        "offline_share": p1.offline_share,
        "label_share": p1.label_share,
        "unimodal_share": p1.unimodal_share,
    }
    for chunk in range(-1, len(split.chunks)):
        items = p1_chunk_records(ds, split, p1, chunk) if chunk >= 0 else []
        seconds = {name: 0.0 for name in arms}
        for i in range(0, len(items), args.batch):
            batch = items[i : i + args.batch]
            for name, arm in arms.items():
                _store(arm, batch)
                if arm.learn is not None:
                    t0 = time.perf_counter()
                    arm.learn(batch)
                    if name != "retrain":
                        seconds[name] += time.perf_counter() - t0
        if retrainer is not None and chunk >= 0:
            seconds["retrain"] += retrainer.retrain()
        rows = split.seen_through(chunk)
        table = []
        for name, arm in arms.items():
            arm.seconds += seconds[name]
            rec = {
                "method": name,
                **base,
                "chunk": chunk,
                **_evaluate(arm, ds, split, rows),
                "seconds": seconds[name],
                "items": len(items),
                "ms_per_item": 1000.0 * seconds[name] / len(items) if items else 0.0,
                "database": int(rows.size),
            }
            results.append(rec)
            table.append(rec)
        label = "before the stream" if chunk < 0 else f"after chunk {chunk} ({len(items)} arrivals)"
        print(f"\n[{bits} bits, seed {seed}] {label}, database {rows.size} rows", flush=True)
        print(report.format_table(table, COLUMNS), flush=True)
    _summary(f"{bits} bits, seed {seed}", results, arms)
    return results


def _summary(title: str, results: list[dict[str, Any]], arms: dict[str, Arm]) -> None:
    last = max(r["chunk"] for r in results)
    final = {r["method"]: r for r in results if r["chunk"] == last}
    print(f"\n[{title}] final (after chunk {last}); total learner seconds over the stream:")
    rows = [{**final[name], "total_seconds": arm.seconds} for name, arm in arms.items()]
    print(report.format_table(rows, (*COLUMNS[:7], "total_seconds")), flush=True)
    fp = final.get("fpocmh")
    if fp is None:
        return
    for other in ("frozen", "naive", "retrain"):
        if other in final:
            o = final[other]
            print(
                f"fpocmh (stored) - {other} stored: I->T {fp['i2t'] - o['i2t']:+.4f}, "
                f"T->I {fp['t2i'] - o['t2i']:+.4f}; "
                f"- {other} re-hashed: I->T {fp['i2t'] - o['i2t_rehashed']:+.4f}, "
                f"T->I {fp['t2i'] - o['t2i_rehashed']:+.4f}"
            )
    print(
        f"fpocmh stored - re-hashed: I->T {fp['i2t'] - fp['i2t_rehashed']:+.4f}, "
        f"T->I {fp['t2i'] - fp['t2i_rehashed']:+.4f}; drift fpocmh {fp['drift']:.4f}"
        + (f", naive {final['naive']['drift']:.4f}" if "naive" in final else "")
    )
    n_items = sum(r["items"] for r in results if r["method"] == "fpocmh")
    print(f"fpocmh learner cost per arrival over the stream: {1000 * arms['fpocmh'].seconds / max(n_items, 1):.3f} ms")
    if "retrain" in arms and arms["retrain"].seconds > 0:
        share = arms["fpocmh"].seconds / arms["retrain"].seconds
        print(
            f"fpocmh stream time {arms['fpocmh'].seconds:.1f}s = {100 * share:.2f}% of retraining's "
            f"{arms['retrain'].seconds:.1f}s"
        )


def plot(results: list[dict[str, Any]], path: Path, title: str) -> None:
    """Top row: stored-code mAP per method. Bottom row (with ``frozen`` in the run): the same minus frozen's,
    where the online learners' differences, small against CCA's gap, can be read."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    methods = list(dict.fromkeys(r["method"] for r in results))
    series = {m: sorted((r for r in results if r["method"] == m), key=lambda r: r["chunk"]) for m in methods}
    rows = 2 if "frozen" in series else 1
    fig, axes = plt.subplots(rows, 2, figsize=(11, 4.2 * rows), squeeze=False)
    colours = {m: f"C{i}" for i, m in enumerate(methods)}
    for col, (key, name) in enumerate((("i2t", "I->T"), ("t2i", "T->I"))):
        for row in range(rows):
            ax = axes[row][col]
            base = [r[key] for r in series["frozen"]] if row else None
            for method, rs in series.items():
                if row and method in ("frozen", "cca"):
                    continue
                xs = [r["chunk"] + 1 for r in rs]
                lines = [(f"{method} (stored codes)", [r[key] for r in rs], "-")]
                if method == "retrain":
                    lines.append(("retrain (database re-hashed)", [r[f"{key}_rehashed"] for r in rs], "--"))
                for label, ys, style in lines:
                    ys = [y - b for y, b in zip(ys, base, strict=True)] if base else ys
                    ax.plot(xs, ys, ls=style, marker="o", ms=3, color=colours[method], label=label)
            ax.set_title(f"{name}, stored database codes" + (", minus frozen" if row else ""))
            ax.set_xlabel("chunks streamed (0 = offline part only)")
            ax.set_ylabel("mAP difference" if row else "mAP")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            if row:
                ax.axhline(0.0, color=colours["frozen"], lw=1)
    axes[0][1].legend(fontsize=8, loc="lower left")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


SEED_VALUES = ("i2t", "t2i", "i2t_rehashed", "t2i_rehashed", "drift", "total_seconds", "stream_ms_per_item")


def _final_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method and seed: the last chunk's record, with the learner's seconds (and ms per arrival) over
    the whole stream."""
    last = max(r["chunk"] for r in results)
    seconds: dict[tuple[str, int], float] = {}
    items: dict[tuple[str, int], int] = {}
    for r in results:
        key = r["method"], r["seed"]
        seconds[key] = seconds.get(key, 0.0) + r["seconds"]
        items[key] = items.get(key, 0) + r.get("items", 0)
    return [
        {
            **r,
            "total_seconds": seconds[r["method"], r["seed"]],
            "stream_ms_per_item": 1000.0 * seconds[r["method"], r["seed"]] / max(items[r["method"], r["seed"]], 1),
        }
        for r in results
        if r["chunk"] == last
    ]


def seed_summary(results: list[dict[str, Any]]) -> str:
    """Mean ± sd over seeds per method after the last chunk, and fpocmh's differences paired by seed."""
    final = _final_rows(results)
    cells = report.aggregate(final, ("method",), SEED_VALUES)
    rows = [
        {"method": c["method"], "seeds": c["runs"], **{v: report.format_mean_sd(c, v) for v in SEED_VALUES}}
        for c in cells
    ]
    lines = [report.format_table(rows, ("method", "seeds", *SEED_VALUES))]
    methods = {c["method"] for c in cells}
    if "fpocmh" in methods:
        for other in ("frozen", "naive", "retrain"):
            if other in methods:
                diffs = [
                    report.paired_difference(final, "method", "fpocmh", other, ("seed",), v) for v in ("i2t", "t2i")
                ]
                lines.append(f"fpocmh - {other}, stored codes: I->T {diffs[0]}, T->I {diffs[1]}")
        gap = {
            name: report.mean_sd([r[v] - r[f"{v}_rehashed"] for r in final if r["method"] == "fpocmh"])
            for name, v in (("I->T", "i2t"), ("T->I", "t2i"))
        }
        lines.append(
            "fpocmh stored - re-hashed: " + ", ".join(f"{k} {m:+.4f} ± {sd:.4f}" for k, (m, sd) in gap.items())
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    ds = load_dataset(args.data)
    seeds = report.seeds(args)
    results: list[dict[str, Any]] = []
    for bits in args.bits:
        for seed in seeds:
            results += run_bits(args, ds, _p1_config(args, seed), bits)
        if len(seeds) > 1:
            print(f"\n[{bits} bits] after the last chunk, mean ± sd over seeds {seeds} (differences paired by seed):")
            print(seed_summary([r for r in results if r["bits"] == bits]), flush=True)
    p1 = config.to_dict(_p1_config(args, seeds[0]))
    report.write_json(args.json, results, protocol="p1", p1={**p1, "seed": seeds}, dataset=ds.name)
    if args.plot:
        for bits in args.bits:
            shares = results[0]
            title = (
                f"P1 stream, {ds.name}, {bits} bits\noffline share {shares['offline_share']}, "
                f"label share {shares['label_share']}, unimodal share {shares['unimodal_share']}"
                + (f", mean of seeds {seeds}" if len(seeds) > 1 else "")
            )
            path = (
                args.plot if len(args.bits) == 1 else args.plot.with_name(f"{args.plot.stem}_{bits}{args.plot.suffix}")
            )
            mean = report.aggregate([r for r in results if r["bits"] == bits], ("method", "chunk"), PLOTTED)
            plot(mean, path, title)
    return 0
