"""``docs/benchmarks.md`` from the results files: one Markdown table per file, with the file's provenance.

Each renderer reads one kind of results file (as its benchmark writes it) and returns the table's lines;
:func:`render` puts them in the catalogue's order under its sections. Nothing here measures anything: a
number in the report is the number in the file beside it, formatted.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fpocmh_core.bench.catalogue import ENTRIES, SECTIONS, Entry

Row = Mapping[str, Any]

METHODS = {
    "frozen": "frozen",
    "naive": "naive fine-tuning",
    "retrain": "full retraining",
    "cca": "CCA",
    "fpocmh": "FPO-CMH",
    "dlch": "DLCH",
    "offline": "offline model",
    "original": "original model",
}


def score(row: Row, key: str) -> str:
    """A mAP as ``mean ± sd`` over the runs (the mean alone for one run); blank when the row lacks it."""
    value = row.get(key)
    if value is None:
        return ""
    sd = row.get(f"{key}_sd")
    return f"{value:.4f}" if not sd or row.get("runs", 1) < 2 else f"{value:.4f} ± {sd:.4f}"


def rate(value: float | None) -> str:
    return "" if value is None else f"{value:,.0f}"


def ms(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def ms_pair(row: Row, name: str) -> str:
    """``<name>_ms`` / ``<name>_p99_ms`` of ``row``, or nothing where its benchmark did not measure them."""
    if row.get(f"{name}_ms") is None:
        return ""
    return f"{ms(row[f'{name}_ms'])} / {ms(row[f'{name}_p99_ms'])}"


def seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def grid(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return lines


def over_seeds(doc: Row) -> list[Row]:
    """The rows averaged over the seeds; a one-seed run of some benchmarks writes only its own rows."""
    return doc.get("over_seeds") or doc["results"]


def offline(doc: Row) -> list[str]:
    by = {(r["method"], r["bits"]): r for r in over_seeds(doc)}
    bits = sorted({b for _, b in by})
    rows = []
    for b in bits:
        model, cca = by.get(("offline", b), {}), by.get(("cca", b), {})
        rows.append(
            [
                str(b),
                score(model, "i2t"),
                score(model, "t2i"),
                score(cca, "i2t"),
                score(cca, "t2i"),
                seconds(model.get("seconds")),
            ]
        )
    return grid(["bits", "I->T", "T->I", "CCA I->T", "CCA T->I", "training s"], rows)


def stream(doc: Row) -> list[str]:
    rows = over_seeds(doc)
    new = any("i2t_new" in r for r in rows)
    header = ["method", "bits", "runs", "I->T", "T->I", "re-hashed I->T", "re-hashed T->I", "stored - re-hashed"]
    header += ["I->T new labels", "T->I new labels"] if new else []
    header += ["learning s"]
    lines = []
    for r in rows:
        rehashed = "i2t_rehashed" in r and r["method"] not in ("frozen", "retrain", "cca")
        gap = f"{r['i2t'] - r['i2t_rehashed']:+.4f} / {r['t2i'] - r['t2i_rehashed']:+.4f}" if rehashed else ""
        cells = [
            METHODS.get(r["method"], r["method"]),
            str(r["bits"]),
            str(r.get("runs", 1)),
            score(r, "i2t"),
            score(r, "t2i"),
            score(r, "i2t_rehashed") if rehashed else "",
            score(r, "t2i_rehashed") if rehashed else "",
            gap,
        ]
        cells += [score(r, "i2t_new"), score(r, "t2i_new")] if new else []
        cells += [seconds(r.get("total_seconds"))]
        lines.append(cells)
    out = grid(header, lines)
    targets = [t for t in doc.get("targets", []) if t.get("met") is not None]
    if targets:
        out += ["", "Targets checked by the benchmark:", ""]
        out += [
            f"- {METHODS.get(t['method'], t['method'])}, {t['target']}: **{'met' if t['met'] else 'not met'}** "
            f"({t['detail']})"
            for t in targets
        ]
    return out


def lifelong(doc: Row) -> list[str]:
    header = ["method", "increment", "runs", "I->T", "T->I", "I->T new", "T->I new", "I->T old", "T->I old", "s"]
    rows = [
        [
            METHODS.get(r["method"], r["method"]),
            str(r["increment"]),
            str(r["runs"]),
            score(r, "i2t"),
            score(r, "t2i"),
            score(r, "i2t_new"),
            score(r, "t2i_new"),
            score(r, "i2t_old"),
            score(r, "t2i_old"),
            seconds(r.get("seconds")),
        ]
        for r in over_seeds(doc)
    ]
    return grid(header, rows)


PIPELINE_RATES = (
    ("ingest_items_per_s", "ingest, 1 encoder, at least once"),
    ("ingest_items_per_s_exactly_once", "ingest, 1 encoder, exactly once"),
    ("two_encoder_items_per_s", "ingest, 2 encoders"),
    ("encoder_items_per_s", "the encoder alone (in process)"),
    ("mlp_image_items_per_s", "the image network alone"),
    ("network_items_per_s", "the networks alone"),
    ("broker_items_per_s", "the broker alone (produce and consume)"),
)


def pipeline(doc: Row) -> list[str]:
    layout = (
        f"{doc.get('brokers', 1)} broker(s), replication factor {doc.get('replication_factor', 1)}, "
        f"{'secured' if doc.get('secure') else 'plaintext'}, {doc['items']:,} arrivals, best of "
        f"{doc['repeats']} round(s)"
    )
    rows = [[label, rate(doc.get(key))] for key, label in PIPELINE_RATES if doc.get(key) is not None]
    if doc.get("ingest_share_of_lower_bound") is not None:
        rows.append(["ingest as a share of its in-process bound", f"{doc['ingest_share_of_lower_bound']:.2f}"])
    out = [f"{doc['broker']}: {layout}.", ""] + grid(["measure", "items/s"], rows)
    queries = doc.get("query") or []
    if queries:
        out += [""] + grid(
            ["codes", "query p50 ms", "query p99 ms", "in-process search ms"],
            [[f"{q['codes']:,}", ms(q["p50_ms"]), ms(q["p99_ms"]), f"{q['inprocess_ms']:.3f}"] for q in queries],
        )
    return out


def query(doc: Row) -> list[str]:
    rounds = doc["rounds"]
    extra = [k for k in ("index", "source") if any(k in r for r in rounds)]
    header = [
        "codes",
        "shards",
        *extra,
        "p50 ms",
        "p99 ms",
        "search p50 ms",
        "search p99 ms",
        "of it index p50 / p99 ms",
        "of it hashing p50 / p99 ms",
        "bare p99 ms",
        "merged == one store",
        "answers lost",
    ]
    rows = [
        [
            f"{r['codes']:,}",
            str(r["shards"]),
            *[str(r.get(k, "")) for k in extra],
            ms(r["p50_ms"]),
            ms(r["p99_ms"]),
            ms(r.get("search_ms")),
            ms(r.get("search_p99_ms")),
            ms_pair(r, "index"),
            ms_pair(r, "hash"),
            ms(r.get("bare_p99_ms")),
            "yes" if r.get("merge_equal") else "no",
            str(r.get("answers_lost", "")),
        ]
        for r in rounds
    ]
    sizes = doc.get("sizes") or {}
    per_size = [
        [f"{int(n):,}", f"{s['bytes_per_code']:.1f}", rate(s["catchup_codes_per_s"]), seconds(s["restart_seconds"])]
        for n, s in sizes.items()
    ]
    return grid(header, rows) + [""] + grid(["codes", "bytes per code", "catch-up codes/s", "restart s"], per_size)


def index(doc: Row) -> list[str]:
    header = [
        "source",
        "bits",
        "codes",
        "index",
        "k",
        "p50 ms",
        "p99 ms",
        "top-k equal to flat",
        "bytes per code",
        "build codes/s",
        "catch-up codes/s",
        "restart s",
    ]
    rows = []
    for r in doc["results"]:
        for key in sorted((k for k in r if k.startswith("k") and k[1:].isdigit()), key=lambda k: int(k[1:])):
            q = r[key]
            equal = f"{q['probes_equal']} probes" if q.get("exact") else f"recall {q.get('recall_at_k', 0):.4f}"
            rows.append(
                [
                    r["source"],
                    str(r.get("bits", 64)),
                    f"{r['size']:,}",
                    r["index"],
                    key[1:],
                    ms(q["p50_ms"]),
                    ms(q["p99_ms"]),
                    equal,
                    f"{r['bytes_per_code_all']:.1f}",
                    rate(r.get("build_codes_per_s")),
                    rate(r.get("catchup_codes_per_s")),
                    seconds(r.get("restore_s")),
                ]
            )
    return grid(header, rows)


def run(doc: Row) -> list[str]:
    stored, lat, faults = doc["stored_codes"], doc["query_latency"], doc["faults"]
    dead = faults.get("dead_letters") or {}
    rows = [
        ["arrivals", f"{doc['arrivals']:,}"],
        ["codes stored / expected", f"{stored['codes']:,} / {stored.get('codes_expected', stored['codes']):,}"],
        ["stored-code mAP I->T / T->I", f"{stored['i2t']:.4f} / {stored['t2i']:.4f}"],
        ["model versions published", str(doc["model_versions_published"])],
        ["store lag, max s", f"{doc['store_lag_s']['max']:.1f}"],
        [f"query p50 / p99 ms (top {lat.get('k', '')})", f"{ms(lat.get('p50_ms'))} / {ms(lat.get('p99_ms'))}"],
        [
            "bad arrivals sent / dead letters",
            f"{sum((faults.get('bad_sent') or {}).values()):,} / {sum(dead.values()):,}",
        ],
        ["roles' exit codes", ", ".join(f"{k} {v}" for k, v in (faults.get("role_exit_codes") or {}).items())],
        ["wall s", f"{doc['wall_s']:.0f}"],
    ]
    return grid(["measure", "value"], rows)


RENDERERS: dict[str, Callable[[Row], list[str]]] = {
    "offline": offline,
    "stream": stream,
    "lifelong": lifelong,
    "pipeline": pipeline,
    "query": query,
    "index": index,
    "run": run,
}


def provenance(doc: Row, path: str) -> str:
    machine = doc.get("machine") or {}
    where = f"{machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, {machine.get('memory_gib', '?')} GiB"
    commit = (doc.get("commit") or "?")[:10]
    return (
        f"[{Path(path).name}]({path}) · `{doc.get('command', '?')}` · commit {commit} · {where} · "
        f"{str(doc.get('finished_at', '?'))[:10]}"
    )


HEAD = """# Benchmarks

Every current table, made by `fpocmh bench report` from the files in [`results/`](results/): do not edit by
hand. `fpocmh bench all` reruns every benchmark below and rewrites this page (`--quick` for the reduced
versions at the end, under 10 minutes; `--list` for the plan and its expected durations). MAP is over the
database codes *as stored* unless a column says re-hashed; ± is the sample sd over the runs (seeds). Under
each table: its file, the command that wrote it, the commit, the machine and the date.
"""


def render(results: Path, entries: Sequence[Entry] = ENTRIES, images: Path | None = None) -> str:
    """The report for the files of ``entries`` found under ``results``; links are relative to its parent."""
    base = results.parent
    lines = [HEAD]
    for section in SECTIONS:
        present = [e for e in entries if e.section == section and (results / f"{e.name}.json").is_file()]
        if not present:
            continue
        lines += [f"## {section}", ""]
        for entry in present:
            path = results / f"{entry.name}.json"
            doc = json.loads(path.read_text())
            lines += [f"### {entry.title}", ""] + RENDERERS[entry.kind](doc) + [""]
            picture = (images or base / "img") / f"{Path(entry.name).name}.png"
            if picture.is_file():
                lines += [f"![{entry.title}]({picture.relative_to(base).as_posix()})", ""]
            lines += [provenance(doc, path.relative_to(base).as_posix()), ""]
    return "\n".join(lines).rstrip() + "\n"
