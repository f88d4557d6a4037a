"""``fpocmh bench <name>``: the benchmarks; each one lives in its own module."""

from __future__ import annotations

import argparse

from fpocmh.commands.registry import add_commands

HELP = "run a benchmark (offline, stream, lifelong, pipeline, query, index), all of them, or the report of their files"

BENCHES = {
    "offline": "fpocmh_core.bench.offline",
    "stream": "fpocmh_core.bench.stream",
    "lifelong": "fpocmh_core.bench.lifelong",
    "pipeline": "consumers.bench.pipeline",
    "query": "consumers.bench.query",
    "index": "fpocmh_core.bench.index",
    "report": "fpocmh.commands.bench_report",
    "all": "fpocmh.commands.bench_all",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_commands(parser, BENCHES, dest="bench", metavar="BENCH", run_attr="_bench")


def run(args: argparse.Namespace) -> int:
    return int(args._bench(args) or 0)
