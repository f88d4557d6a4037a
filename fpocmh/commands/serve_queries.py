"""``fpocmh serve-queries``: the query role, one shard of the code store (the whole store by default)."""

from __future__ import annotations

import argparse

from fpocmh.commands.pipeline_args import add_pipeline_arguments, load_config, require_broker, role_setup

HELP = "run a query consumer: materialise (a shard of) the codes topic and answer retrieval requests"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_pipeline_arguments(parser)
    parser.add_argument(
        "--shard",
        metavar="s/S",
        default="0/1",
        help="serve shard s of S: the codes partitions p with p mod S = s (replicas of a shard share its "
        "request group); 0/1 holds the whole store",
    )


def run(args: argparse.Namespace) -> int:
    from consumers.query.role import run_query
    from consumers.query.shards import ShardSpec

    shard = ShardSpec.parse(args.shard)
    cfg = load_config(args)
    require_broker(cfg, "fpocmh serve-queries")
    if shard.count > cfg.partitions.codes:
        raise ValueError(
            f"--shard {args.shard}: {shard.count} shards need at least as many codes partitions "
            f"(partitions.codes is {cfg.partitions.codes})"
        )
    metrics, stop = role_setup(cfg, cfg.query.metrics_port)
    run_query(cfg, metrics, stop, shard)
    return 0
