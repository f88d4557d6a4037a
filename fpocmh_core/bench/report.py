"""What every benchmark shares: machine description, table printing, JSON and plot output."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


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


def add_common_arguments(
    parser: argparse.ArgumentParser, bits_default: Sequence[int] = (64,), multi_seed: bool = False
) -> None:
    """The arguments every benchmark takes; ``multi_seed`` adds ``--seeds`` (read both with :func:`seeds`)."""
    parser.add_argument("--data", help="dataset file or folder (default: $FPOCMH_DATA, ./data, ../shared/data)")
    parser.add_argument("--bits", type=int, nargs="+", default=list(bits_default), help="code lengths")
    parser.add_argument(
        "--text-feature",
        metavar="KEY",
        help="the dataset's array to use as text (default txt_feat, bag of tags; e.g. txt_minilm, sentence embeddings)",
    )
    parser.add_argument("--image-feature", metavar="KEY", help="the dataset's array to use as image (default img_feat)")
    parser.add_argument("--json", type=Path, help="write the results as JSON to this file")
    group = parser.add_mutually_exclusive_group() if multi_seed else parser
    group.add_argument("--seed", type=int, default=0, help="seed for splits and initialisation")
    if multi_seed:
        group.add_argument(
            "--seeds",
            type=int,
            nargs="+",
            metavar="SEED",
            help="run once per seed (each changes the split, the initialisation and the stream order) and "
            "report mean and standard deviation over the seeds",
        )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def dataset(args: argparse.Namespace) -> Any:
    """The benchmark's dataset with the feature arrays ``--image-feature`` / ``--text-feature`` chose."""
    from fpocmh_core.data import load_dataset

    ds = load_dataset(args.data)
    return ds.with_features(getattr(args, "image_feature", None), getattr(args, "text_feature", None))


def seeds(args: argparse.Namespace) -> list[int]:
    """The seeds to run: ``--seeds`` when given, else the single ``--seed``."""
    return list(dict.fromkeys(getattr(args, "seeds", None) or [args.seed]))


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def aggregate(rows: Iterable[Mapping[str, Any]], keys: Sequence[str], values: Sequence[str]) -> list[dict[str, Any]]:
    """One row per distinct ``keys`` tuple (first-seen order): ``value`` = mean, ``value_sd`` = sample sd,
    ``runs`` = how many rows (seeds) went in."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    out = []
    for key, group in groups.items():
        cell: dict[str, Any] = dict(zip(keys, key, strict=True))
        cell["runs"] = len(group)
        for v in values:
            cell[v], cell[f"{v}_sd"] = mean_sd([r[v] for r in group])
        out.append(cell)
    return out


@dataclass(frozen=True)
class Difference:
    """``a - b`` paired over runs (same seed, so the same split): mean, sample sd and number of pairs."""

    mean: float
    sd: float
    runs: int

    @property
    def exceeds_2sd(self) -> bool:
        """|mean| > 2 sd, which needs at least two runs to mean anything."""
        return self.runs > 1 and abs(self.mean) > 2 * self.sd

    def __str__(self) -> str:
        text = f"{self.mean:+.4f} ± {self.sd:.4f}"
        if self.runs < 2:
            return text
        return f"{text} ({'>' if self.exceeds_2sd else 'not >'} 2 sd)"


def paired_difference(
    rows: Iterable[Mapping[str, Any]], select: str, a: str, b: str, pair_on: Sequence[str], value: str
) -> Difference:
    """Difference in ``value`` between the rows with ``select == a`` and ``select == b``, paired on ``pair_on``."""
    by: dict[str, dict[tuple, float]] = {a: {}, b: {}}
    for row in rows:
        if row[select] in by:
            by[row[select]][tuple(row[k] for k in pair_on)] = row[value]
    common = [k for k in by[a] if k in by[b]]
    if not common:
        raise ValueError(f"no runs of both {a!r} and {b!r} to compare")
    mean, sd = mean_sd([by[a][k] - by[b][k] for k in common])
    return Difference(mean, sd, len(common))


def format_mean_sd(row: Mapping[str, Any], value: str) -> str:
    mean, sd = row[value], row[f"{value}_sd"]
    return f"{mean:.4f}" if row.get("runs", 1) < 2 else f"{mean:.4f} ± {sd:.4f}"


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


def commit() -> str:
    """The checkout's commit (with ``+dirty`` when files differ from it), or "" outside git."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=here, capture_output=True, text=True)
    except (OSError, subprocess.SubprocessError):
        return ""
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if head.returncode == 0 else ""


def provenance() -> dict[str, Any]:
    """What every results file records first: the command that made it, the commit, the machine, the date."""
    return {
        "command": " ".join(["fpocmh", *sys.argv[1:]]) if sys.argv else "",
        "commit": commit(),
        "machine": machine(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_json(path: Path | None, results: list[dict[str, Any]], **extra: Any) -> None:
    if path is None:
        return
    doc = {**provenance(), **extra, "results": results}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2))
