"""``fpocmh broker``: the embedded tansu broker in the foreground, for running roles by hand."""

from __future__ import annotations

import argparse

HELP = "run the embedded Kafka-protocol broker (tansu, in memory) until Ctrl-C"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="listen address")
    parser.add_argument("--port", type=int, default=0, help="port (0: a free one)")


def run(args: argparse.Namespace) -> int:
    import threading

    from consumers.broker import EmbeddedBroker
    from consumers.runtime import install_signal_handlers

    stop = threading.Event()
    install_signal_handlers(stop)
    with EmbeddedBroker(args.host, args.port or None) as bootstrap:
        print(f"broker ready: --bootstrap {bootstrap}   (or FPOCMH_KAFKA_BOOTSTRAP_SERVERS={bootstrap})", flush=True)
        stop.wait()
    return 0
