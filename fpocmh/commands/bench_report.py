"""``fpocmh bench report``: rewrite ``docs/benchmarks.md`` from the results files, table by table."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "write docs/benchmarks.md from the results files in docs/results/ (every table with its command and commit)"

RESULTS = Path("docs/results")


def report_path(results: Path, asked: Path | None) -> Path:
    """The report sits beside its results folder (its links are relative to it) unless told otherwise."""
    return asked or results.parent / "benchmarks.md"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of results files")
    parser.add_argument(
        "--out", type=Path, help="the Markdown report to write (default: benchmarks.md beside --results)"
    )
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if --out differs from the files")


def run(args: argparse.Namespace) -> int:
    from fpocmh_core.bench.tables import render

    if not args.results.is_dir():
        raise SystemExit(f"bench report: no results folder {args.results} (run from the repository, or pass --results)")
    text = render(args.results)
    args.out = report_path(args.results, args.out)
    if args.check:
        same = args.out.is_file() and args.out.read_text() == text
        print(f"{args.out}: {'matches' if same else 'differs from'} {args.results}")
        return 0 if same else 1
    args.out.write_text(text)
    print(f"wrote {args.out} ({text.count(chr(10))} lines) from {args.results}")
    return 0
