"""What every benchmark shares: machine description, table printing, JSON and plot output."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    """The facts a reader needs to compare timings: CPU, cores, memory, library versions."""
    import numpy
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_gib, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def add_common_arguments(parser: argparse.ArgumentParser, bits_default: Sequence[int] = (64,)) -> None:
    parser.add_argument("--data", help="dataset file or folder (default: $FPOCMH_DATA, ./data, ../shared/data)")
    parser.add_argument("--bits", type=int, nargs="+", default=list(bits_default), help="code lengths")
    parser.add_argument("--json", type=Path, help="write the results as JSON to this file")
    parser.add_argument("--seed", type=int, default=0, help="seed for splits and initialisation")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def format_table(rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> str:
    rows = list(rows)

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"
        return "" if v is None else str(v)

    grid = [list(columns)] + [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in grid) for i in range(len(columns))]
    lines = [" | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in grid]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: Path | None, results: list[dict[str, Any]], **extra: Any) -> None:
    if path is None:
        return
    doc = {
        "command": " ".join(["fpocmh", *sys.argv[1:]]) if sys.argv else "",
        "machine": machine(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
        "results": results,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2))
