"""``fpocmh serve-queries``: the query role (each copy holds the whole store)."""

from __future__ import annotations

import argparse

from fpocmh.commands.pipeline_args import add_pipeline_arguments, load_config, require_broker, role_setup

HELP = "run a query consumer: materialise the codes topic and answer retrieval requests"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_pipeline_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from consumers.query import run_query

    cfg = load_config(args)
    require_broker(cfg, "fpocmh serve-queries")
    metrics, stop = role_setup(cfg, cfg.query.metrics_port)
    run_query(cfg, metrics, stop)
    return 0
