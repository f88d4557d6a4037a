"""``fpocmh encode``: the encoder role (one copy; run more for more throughput)."""

from __future__ import annotations

import argparse

from fpocmh.commands.pipeline_args import add_pipeline_arguments, load_config, require_broker, role_setup

HELP = "run an encoder: hash arrivals with the current model version and write their codes"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_pipeline_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from consumers.encoder.role import run_encoder

    cfg = load_config(args)
    require_broker(cfg, "fpocmh encode")
    metrics, stop = role_setup(cfg, cfg.encoder.metrics_port)
    run_encoder(cfg, metrics, stop)
    return 0
