"""``fpocmh replay``: a benchmark protocol as an arrival stream at a set rate, optionally scored live."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING

from fpocmh.commands.pipeline_args import add_pipeline_arguments, load_config, require_broker, role_setup

if TYPE_CHECKING:
    from producers.replay import ChunkScore

HELP = "replay protocol P1 as a partial-modal arrival stream at a set rate; --score: live mAP per chunk"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_pipeline_arguments(parser)
    parser.add_argument("--data", help="dataset file or folder (default: $FPOCMH_DATA, ./data, ../shared/data)")
    parser.add_argument("--protocol", default="p1", choices=["p1"], help="stream protocol")
    parser.add_argument("--rate", type=float, help="items per second, 0 = unthrottled (default: replay.rate)")
    parser.add_argument("--unimodal-share", type=float, help="share of pairs split into two unimodal items")
    parser.add_argument("--label-share", type=float, help="share of stream items that carry their labels")
    parser.add_argument("--no-offline", action="store_true", help="skip the offline part (chunk -1)")
    parser.add_argument(
        "--score", action="store_true", help="after each chunk, send the query set as requests and print mAP@K"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def p1_overrides(args: argparse.Namespace) -> dict[str, float]:
    return {
        key: value
        for key, value in (("unimodal_share", args.unimodal_share), ("label_share", args.label_share))
        if value is not None
    }


def score_printer(k: int) -> Callable[[ChunkScore], None]:
    """``replay_p1``'s ``on_chunk``: each chunk's live mAP@k line, printed as soon as it is measured."""
    from producers.replay import format_score

    return lambda score: print(format_score(score, k), flush=True)


def run(args: argparse.Namespace) -> int:
    from consumers.query import QueryClient
    from fpocmh_core import config
    from fpocmh_core.data import load_dataset
    from fpocmh_core.protocols import P1Config, p1_split
    from producers.replay import replay_p1

    sets = [f"replay.rate={args.rate}"] if args.rate is not None else []
    sets += ["replay.offline=false"] if args.no_offline else []
    cfg = load_config(args, *sets)
    require_broker(cfg, "fpocmh replay")
    ds = load_dataset(args.data)
    p1cfg = config.load(P1Config, "p1", overrides=p1_overrides(args))
    split = p1_split(ds, p1cfg)
    metrics, stop = role_setup(cfg, cfg.replay.metrics_port)
    client = QueryClient(cfg, metrics=metrics, stop=stop) if args.score else None
    try:
        report, _scores = replay_p1(
            cfg, ds, split, p1cfg, metrics, stop, client, not args.quiet, score_printer(cfg.replay.score_topk)
        )
    finally:
        if client is not None:
            client.close()
    print(("interrupted: " if stop.is_set() else "replayed ") + report.summary())
    return 130 if stop.is_set() else 0
