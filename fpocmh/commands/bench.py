"""``fpocmh bench <name>``: the benchmarks; each one lives in its own module."""

from __future__ import annotations

import argparse
import importlib

HELP = "run a benchmark (offline, stream, lifelong, pipeline) and print/write its table"

BENCHES = {
    "offline": "fpocmh_core.bench.offline",
    "stream": "fpocmh_core.bench.stream",
    "lifelong": "fpocmh_core.bench.lifelong",
    "pipeline": "consumers.bench",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fpocmh.cli import Formatter

    sub = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, module_name in BENCHES.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        p = sub.add_parser(name, help=module.HELP, description=module.HELP, formatter_class=Formatter)
        module.add_arguments(p)
        p.set_defaults(_bench=module.run)


def run(args: argparse.Namespace) -> int:
    return int(args._bench(args) or 0)
