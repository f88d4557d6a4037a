"""``fpocmh learn``: the learner role."""

from __future__ import annotations

import argparse

from fpocmh.commands.pipeline_args import add_pipeline_arguments, load_config, require_broker, role_setup

HELP = "run the learner: learn from arrivals and publish model versions; resumes from its checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_pipeline_arguments(parser)
    parser.add_argument("--data", help="dataset to train version 0 on when there is no checkpoint and no learner.init")


def run(args: argparse.Namespace) -> int:
    from consumers.learner.role import run_learner

    cfg = load_config(args)
    require_broker(cfg, "fpocmh learn")
    metrics, stop = role_setup(cfg, cfg.learner.metrics_port)
    run_learner(cfg, metrics, stop, data=args.data)
    return 0
