"""``fpocmh broker``: a local broker in the foreground, for running roles by hand."""

from __future__ import annotations

import argparse
import sys

from consumers.brokers.launch import BROKER_KINDS
from fpocmh.commands.pipeline_args import BROKER_HELP, BROKERS_HELP

HELP = "run a local broker (tansu in memory, or Apache Kafka) until Ctrl-C"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kind", choices=BROKER_KINDS, default=BROKER_KINDS[0], help=BROKER_HELP)
    parser.add_argument("--host", default="127.0.0.1", help="listen address")
    parser.add_argument("--port", type=int, default=0, help="port (0: a free one; of the first node of a cluster)")
    parser.add_argument("--brokers", type=int, default=1, metavar="N", help=BROKERS_HELP)


def run(args: argparse.Namespace) -> int:
    import threading

    from consumers import settings
    from consumers.brokers.launch import local_broker
    from consumers.lifecycle import install_signal_handlers

    stop = threading.Event()
    install_signal_handlers(stop)
    # A cluster's internal topics are replicated as the pipeline's own will be (config/pipeline.yaml).
    replication = settings.load().replication(args.brokers)
    broker = local_broker(args.kind, args.brokers, replication, host=args.host, port=args.port or None)
    with broker as bootstrap:
        print(f"broker ready: --bootstrap {bootstrap}   (or FPOCMH_KAFKA_BOOTSTRAP_SERVERS={bootstrap})", flush=True)
        # Poll the process too: a broker that died must not leave a command that looks alive.
        while not stop.wait(0.5):
            code = broker.exit_code()
            if code is not None:
                print(
                    f"fpocmh broker: error: the {args.kind} broker exited with code {code} (log {broker.log_path})",
                    file=sys.stderr,
                )
                return 1
    return 0
