"""``fpocmh bench all``: rerun the headline benchmarks of the catalogue, then rewrite ``docs/benchmarks.md``.

Each benchmark runs as its own ``fpocmh`` process (a crash or a leaked broker of one does not touch the next),
its output in a log file; a failed one is reported at the end and the others still run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from fpocmh.commands.bench_report import RESULTS, report_path

HELP = "rerun every headline benchmark (or --quick: reduced versions, under 10 minutes) and rewrite docs/benchmarks.md"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="the reduced versions (one seed, small sizes)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these entries only (names from --list)")
    parser.add_argument("--list", action="store_true", help="print the plan and its expected minutes, run nothing")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder the results files go to")
    parser.add_argument("--images", type=Path, help="folder the mAP plots go to (default: img/ beside --results)")
    parser.add_argument("--report", type=Path, help="the Markdown report to rewrite (default: beside --results)")
    parser.add_argument("--logs", type=Path, default=Path("runs/bench_all"), help="one log file per benchmark")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def plan(args: argparse.Namespace) -> list:
    from fpocmh_core.bench import catalogue

    if args.only:
        return [catalogue.by_name(name) for name in args.only]
    return list(catalogue.QUICK_ENTRIES if args.quick else catalogue.FULL)


def command(entry, args: argparse.Namespace) -> list[str]:
    argv = [sys.executable, "-m", "fpocmh", *entry.args, "--json", str(args.results / f"{entry.name}.json")]
    if entry.plots:
        argv += ["--plot", str(args.images / f"{Path(entry.name).name}.png")]
    return argv


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from fpocmh_core.bench.tables import render

    entries = plan(args)
    args.images = args.images or args.results.parent / "img"
    total = sum(e.minutes for e in entries)
    print(f"{len(entries)} benchmark(s), about {total:.0f} min on a 2-core machine:")
    for e in entries:
        print(f"  {e.name:<42} ~{e.minutes:>3.0f} min  fpocmh {' '.join(e.args)}")
    if args.list:
        return 0
    args.logs.mkdir(parents=True, exist_ok=True)
    failed: list[tuple[str, Path]] = []
    bar = tqdm(total=total, unit="min", disable=args.quiet, bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} min est.")
    try:
        for e in entries:
            bar.set_description(e.name)
            log = args.logs / f"{Path(e.name).name}.log"
            (args.results / e.name).parent.mkdir(parents=True, exist_ok=True)
            args.images.mkdir(parents=True, exist_ok=True)
            started = time.monotonic()
            with open(log, "w") as out:
                code = subprocess.run(command(e, args), stdout=out, stderr=subprocess.STDOUT).returncode
            took = (time.monotonic() - started) / 60
            bar.update(e.minutes)
            bar.write(
                f"{'ok  ' if code == 0 else 'FAIL'} {e.name}: {took:.1f} min (expected {e.minutes:.0f}); log {log}"
            )
            if code != 0:
                failed.append((e.name, log))
    finally:
        bar.close()
    report = report_path(args.results, args.report)
    report.write_text(render(args.results))
    print(f"wrote {report}")
    for name, log in failed:
        print(f"bench all: {name} failed; its output is in {log}", file=sys.stderr)
    return 1 if failed else 0
