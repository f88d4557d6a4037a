"""``fpocmh <command>``: every job of the system behind one command.

Each command lives in ``fpocmh/commands/<name>.py`` and exposes ``HELP``, ``add_arguments(parser)``
and ``run(args) -> int``; heavy imports stay inside ``run`` so that ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import logging
import sys

from consumers.brokers.process import BrokerError
from fpocmh.commands.registry import Formatter, add_commands

# name -> module; the order is the order of ``fpocmh --help``.
COMMANDS = {
    "run": "fpocmh.commands.run",
    "replay": "fpocmh.commands.replay",
    "encode": "fpocmh.commands.encode",
    "learn": "fpocmh.commands.learn",
    "query": "fpocmh.commands.query",
    "serve-queries": "fpocmh.commands.serve_queries",
    "topics": "fpocmh.commands.topics",
    "broker": "fpocmh.commands.broker",
    "secrets": "fpocmh.commands.secrets",
    "train": "fpocmh.commands.train",
    "bench": "fpocmh.commands.bench",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fpocmh",
        description="Online cross-modal hashing on streams (FPO-CMH, DLCH) with Kafka.",
        formatter_class=Formatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_commands(parser, COMMANDS, dest="command", metavar="COMMAND", run_attr="_run")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, BrokerError) as exc:
        # Config, dataset, state and broker errors already name the file and what was expected.
        print(f"fpocmh {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        # Broker loss, delivery failures, role failures: one line that says what and where.
        from consumers.health import BrokerUnavailable
        from consumers.runtime import DeliveryError, RoleStopped

        if not isinstance(exc, BrokerUnavailable | DeliveryError | RoleStopped):
            raise
        print(f"fpocmh {args.command}: error: {exc}", file=sys.stderr)
        return 3
