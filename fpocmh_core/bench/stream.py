"""``fpocmh bench stream``: protocol P1 (partial-modal stream) or P3 (new categories arriving late in one)
in process, every method side by side on the same split, features, bits and seed.

Methods:
- ``frozen``: the offline model, never updated;
- ``naive``: the offline model fine-tuned online (no bank, no rehearsal);
- ``retrain``: after every chunk, full retraining from scratch on the offline part plus every stream
  item seen so far that carried its labels (``--retrain-seeds`` limits it to some seeds: it costs ~25 min
  a seed on one core);
- ``cca``: linear CCA with sign codes, fitted on the offline part, never updated;
- ``fpocmh``: the FPO-CMH learner, from the same offline model;
- ``dlch``: the DLCH learner, from its own original phase on the offline part, fed the same micro-batches;
  each chunk is one increment, closed at the chunk's end.

Database codes are stored as the pipeline stores them (``fpocmh_core/bench/arms.py`` says how, DLCH's
learner-assigned codes included). After each chunk, queries (always from the current model) are ranked
against the stored codes and against the database re-hashed by the current model; drift is the share of
stored bits that a re-hash would change. Stored-code mAP is also given over the queries carrying a new
label (``*_new``) and the others (``*_old``); P1 has no new labels, so there ``*_new`` is null and
``*_old`` is the overall value. ``seconds`` is the time in the method's learning calls during a chunk.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from fpocmh_core import codes, config, evaluation
from fpocmh_core.bench import arms as arms_mod
from fpocmh_core.bench import report, stream_summary
from fpocmh_core.bench.arms import Arm
from fpocmh_core.data import CrossModalDataset
from fpocmh_core.protocols import Stream, StreamSplit, load_stream
from fpocmh_core.records import Modality

HELP = (
    "P1 or P3 stream: frozen, naive, retrain, CCA, FPO-CMH and DLCH side by side, mAP after every chunk "
    "(all queries, with and without new labels)"
)
COLUMNS = (
    "method",
    "chunk",
    "i2t",
    "t2i",
    "i2t_rehashed",
    "t2i_rehashed",
    "i2t_new",
    "t2i_new",
    "i2t_old",
    "t2i_old",
    "drift",
    "seconds",
    "ms_per_item",
)
IMG, TXT = Modality.IMAGE, Modality.TEXT
PLOTTED = ("i2t", "t2i", "i2t_rehashed", "t2i_rehashed")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    report.add_common_arguments(parser, multi_seed=True)
    parser.add_argument(
        "--protocol",
        choices=["p1", "p3"],
        default="p1",
        help="stream protocol: p1 (config/p1.yaml) or p3, new categories arriving late (config/p3.yaml)",
    )
    parser.add_argument("--offline-share", type=float, help="share of the database that is offline (default 0.3)")
    parser.add_argument("--unimodal-share", type=float, help="share of stream pairs split into unimodal items")
    parser.add_argument("--label-share", type=float, help="share of stream items that carry their labels")
    parser.add_argument("--chunks", type=int, help="number of stream chunks (n_chunks)")
    parser.add_argument("--new-chunks", type=int, help="p3: the new-label items arrive in the last this many chunks")
    parser.add_argument(
        "--methods", nargs="+", choices=arms_mod.METHODS, default=list(arms_mod.METHODS), help="methods to run"
    )
    parser.add_argument(
        "--retrain-seeds",
        type=int,
        nargs="+",
        metavar="SEED",
        help="run the retrain arm on these seeds only (default: every seed); the cost target compares with it "
        "on these seeds",
    )
    parser.add_argument("--plot", type=Path, help="write the stored-code mAP curves to this PNG")
    parser.add_argument("--batch", type=int, default=256, help="micro-batch size handed to the learners")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    for name in arms_mod.CONFIGURED:
        parser.add_argument(
            f"--{name}-set", nargs="+", default=[], metavar="KEY=VALUE", help=f"overrides for config/{name}.yaml"
        )


def _stream(args: argparse.Namespace, ds: CrossModalDataset, seed: int) -> Stream:
    overrides: dict[str, Any] = {"seed": seed}
    flags = (
        ("offline_share", "offline_share"),
        ("unimodal_share", "unimodal_share"),
        ("label_share", "label_share"),
        ("chunks", "n_chunks"),
    )
    if args.protocol == "p3":
        flags += (("new_chunks", "new_chunks"),)
    elif args.new_chunks is not None:
        raise config.ConfigError("--new-chunks is a p3 setting")
    for flag, key in flags:
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    return load_stream(ds, args.protocol, overrides)


def _retrains(args: argparse.Namespace, seed: int) -> bool:
    return "retrain" in args.methods and (not args.retrain_seeds or seed in args.retrain_seeds)


def _evaluate(arm: Arm, ds: CrossModalDataset, split: StreamSplit, rows: np.ndarray) -> dict[str, float | None]:
    q = split.query
    q_img, q_txt = arm.encode(ds.image[q], IMG), arm.encode(ds.text[q], TXT)
    st_img, st_txt = arm.stored[IMG][rows], arm.stored[TXT][rows]

    def aps(db_img: np.ndarray, db_txt: np.ndarray) -> dict[str, np.ndarray]:
        ap = evaluation.average_precisions
        return {
            "i2t": ap(q_img, db_txt, ds.labels[q], ds.labels[rows]),
            "t2i": ap(q_txt, db_img, ds.labels[q], ds.labels[rows]),
        }

    stored = aps(st_img, st_txt)
    out: dict[str, float | None] = {d: float(v.mean()) for d, v in stored.items()}
    if arm.static:
        out |= {f"{d}_rehashed": out[d] for d in stored}
        out["drift"] = 0.0
    else:
        re_img, re_txt = arm.encode(ds.image[rows], IMG), arm.encode(ds.text[rows], TXT)
        out |= {f"{d}_rehashed": float(v.mean()) for d, v in aps(re_img, re_txt).items()}
        out["drift"] = codes.bit_drift(np.vstack([st_img, st_txt]), np.vstack([re_img, re_txt]))
    new = split.query_new
    for d, v in stored.items():
        # JSON null, not NaN, when no query carries a new label (P1): there is no such group to score.
        out[f"{d}_new"] = float(v[new].mean()) if new.any() else None
        out[f"{d}_old"] = float(v[~new].mean()) if (~new).any() else None
    return out


def run_bits(args: argparse.Namespace, ds: CrossModalDataset, stream: Stream, bits: int) -> list[dict[str, Any]]:
    """One run of every method on one seed's stream (the seed sets the split, the models and the order)."""
    from fpocmh_core.offline import TrainingSet, load_offline_config, train_offline

    cfg, split = stream.config, stream.split
    seed = cfg.seed
    methods = [m for m in args.methods if m != "retrain" or _retrains(args, seed)]
    off_cfg = load_offline_config(overrides=config.parse_overrides(args.offline_set))
    start = time.perf_counter()
    offline = train_offline(TrainingSet.from_rows(ds, split.offline), bits, off_cfg, progress=not args.quiet, seed=seed)
    print(
        f"[{bits} bits, seed {seed}] offline model on {split.offline.size} pairs: {time.perf_counter() - start:.1f}s, "
        f"validation mAP {offline.val_map}",
        flush=True,
    )
    arms = arms_mod.build(args, methods, ds, split, bits, seed, offline.model, off_cfg)
    results: list[dict[str, Any]] = []
    base = {
        "protocol": stream.name,
        "bits": bits,
        "seed": seed,
        "offline_share": cfg.offline_share,
        "label_share": cfg.label_share,
        "unimodal_share": cfg.unimodal_share,
    }
    for chunk in range(-1, len(split.chunks)):
        items = stream.chunk_records(ds, chunk) if chunk >= 0 else []
        seconds = {name: 0.0 for name in arms}
        for i in range(0, len(items), args.batch):
            batch = items[i : i + args.batch]
            for name, arm in arms.items():
                arm.store(batch)
                if arm.learn is not None:
                    seconds[name] += arm.step(arm.learn, batch)
        for name, arm in arms.items():
            if arm.end_chunk is not None and chunk >= 0:
                seconds[name] += arm.step(arm.end_chunk)
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
                "new_queries": int(split.query_new.sum()),
            }
            results.append(rec)
            table.append(rec)
        label = "before the stream" if chunk < 0 else f"after chunk {chunk} ({len(items)} arrivals)"
        print(f"\n[{bits} bits, seed {seed}] {label}, database {rows.size} rows", flush=True)
        print(report.format_table(table, COLUMNS), flush=True)
    return results


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


def run(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    arms_mod.check_overrides(args)
    ds = report.dataset(args)
    seeds = report.seeds(args)
    results: list[dict[str, Any]] = []
    over_seeds: list[dict[str, Any]] = []
    targets: list[dict[str, Any]] = []
    first = _stream(args, ds, seeds[0])

    def write(complete: bool) -> None:
        # Written after every seed too, so that a long run stopped early keeps what it measured.
        report.write_json(
            args.json,
            results,
            protocol=args.protocol,
            **{args.protocol: {**config.to_dict(first.config), "seed": seeds}},
            dataset=ds.name,
            complete=complete,
            retrain_seeds=[s for s in seeds if _retrains(args, s)],
            new_queries=int(first.split.query_new.sum()),
            over_seeds=over_seeds,
            targets=targets,
        )

    for bits in args.bits:
        for seed in seeds:
            results += run_bits(args, ds, _stream(args, ds, seed), bits)
            write(complete=False)
        cells, found, lines = stream_summary.summary([r for r in results if r["bits"] == bits])
        over_seeds += [{"bits": bits, **c} for c in cells]
        targets += [{"bits": bits, **t} for t in found]
        print(f"\n[{bits} bits] after the last chunk, mean ± sd over seeds {seeds} (differences paired by seed):")
        print("\n".join(lines), flush=True)
    write(complete=True)
    if args.plot:
        for bits in args.bits:
            shares = results[0]
            title = (
                f"{args.protocol.upper()} stream, {ds.name}, {bits} bits\noffline share {shares['offline_share']}, "
                f"label share {shares['label_share']}, unimodal share {shares['unimodal_share']}"
                + (f", mean of seeds {seeds}" if len(seeds) > 1 else "")
            )
            path = (
                args.plot if len(args.bits) == 1 else args.plot.with_name(f"{args.plot.stem}_{bits}{args.plot.suffix}")
            )
            mean = report.aggregate([r for r in results if r["bits"] == bits], ("method", "chunk"), PLOTTED)
            plot(mean, path, title)
    return 0
