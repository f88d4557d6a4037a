"""``fpocmh train``: train the offline hash model and write a checkpoint folder."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "train the supervised offline hash model on the P1 offline part (or all) and write a checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", help="dataset file or folder (default: $FPOCMH_DATA, ./data, ../shared/data)")
    parser.add_argument("--bits", type=int, default=64, help="code length")
    parser.add_argument(
        "--train-on", choices=["offline", "all"], default="offline", help="the P1 offline part, or the whole database"
    )
    parser.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    parser.add_argument("--config", type=Path, help="a YAML file overriding config/offline.yaml")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="overrides for config/offline.yaml")
    parser.add_argument("--seed", type=int, default=0, help="seed for the split and the training")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the machine is shared)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import torch

    from fpocmh_core import config
    from fpocmh_core.bench.offline import query_scores, training_setup
    from fpocmh_core.offline import load_offline_config, save_offline_checkpoint, train_offline

    torch.set_num_threads(args.threads)
    setup = training_setup(args.data, args.seed, args.train_on)
    ds, p1, split, rows, data = setup.ds, setup.p1, setup.split, setup.rows, setup.data
    cfg = load_offline_config(args.config, config.parse_overrides(args.set))
    print(f"training {args.bits}-bit offline model on {len(rows)} pairs of {ds.name} ({args.train_on})", flush=True)
    result = train_offline(data, args.bits, cfg, progress=not args.quiet, seed=args.seed)
    scores = query_scores(result.model.encode, ds, split)
    extra = {
        "train_on": args.train_on,
        "seed": args.seed,
        "p1": config.to_dict(p1),
        "query_map": {"n_query": int(split.query.size), "i2t": scores.i2t, "t2i": scores.t2i},
    }
    save_offline_checkpoint(result, args.out, cfg, data, ds, rows, extra)
    print(
        f"{result.seconds:.1f}s, best epoch {result.epochs}, validation mAP {result.val_map:.4f}\n"
        f"query mAP ({split.query.size} queries vs {split.database.size} database items): "
        f"I->T {scores.i2t:.4f}  T->I {scores.t2i:.4f}\n"
        f"checkpoint: {args.out}"
    )
    return 0
