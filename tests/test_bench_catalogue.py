"""The benchmark catalogue, its results files and the docs made from them agree with one another."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fpocmh.cli import build_parser
from fpocmh.commands.bench_all import command
from fpocmh_core.bench import arms, catalogue, tables

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
PROVENANCE = ("command", "commit", "machine", "finished_at")


def results_files() -> list[Path]:
    return sorted(RESULTS.rglob("*.json"))


@pytest.mark.parametrize("entry", catalogue.ENTRIES, ids=lambda e: e.name)
def test_every_catalogue_command_is_one_the_cli_accepts(entry, tmp_path):
    where = argparse.Namespace(results=tmp_path, images=tmp_path / "img")
    args = build_parser().parse_args(command(entry, where)[3:])  # after "python -m fpocmh"
    assert args.json == tmp_path / f"{entry.name}.json"


@pytest.mark.parametrize("entry", [e for e in catalogue.ENTRIES if e.kind == "stream"], ids=lambda e: e.name)
def test_every_stream_entry_sets_only_settings_its_configs_accept(entry, tmp_path):
    where = argparse.Namespace(results=tmp_path, images=tmp_path / "img")
    arms.check_overrides(build_parser().parse_args(command(entry, where)[3:]))


def test_entry_names_are_unique_and_every_section_is_shown():
    names = [e.name for e in catalogue.ENTRIES]
    assert len(names) == len(set(names))
    assert {e.section for e in catalogue.ENTRIES} <= set(catalogue.SECTIONS)
    assert all(e.quick == (e in catalogue.QUICK_ENTRIES) for e in catalogue.ENTRIES)


def test_results_holds_current_files_only_each_with_its_command_and_commit():
    known = {e.name for e in catalogue.ENTRIES}
    for path in results_files():
        name = path.relative_to(RESULTS).with_suffix("").as_posix()
        assert name in known, f"{path.name} is no benchmark of the catalogue (superseded files go; git keeps them)"
        assert "session" not in name
        doc = json.loads(path.read_text())
        missing = [key for key in PROVENANCE if not doc.get(key)]
        assert not missing, f"{path.name} lacks {missing}"
        assert re.fullmatch(r"[0-9a-f]{7,40}(\+dirty)?", doc["commit"]), doc["commit"]
    full = {e.name for e in catalogue.FULL}
    present = {p.relative_to(RESULTS).with_suffix("").as_posix() for p in results_files()}
    assert full <= present, f"full benchmarks without a results file: {sorted(full - present)}"


def test_the_committed_report_is_what_the_results_make():
    assert (ROOT / "docs" / "benchmarks.md").read_text() == tables.render(RESULTS), (
        "docs/benchmarks.md is stale: run `fpocmh bench report`"
    )


def results_section(readme: str) -> str:
    start = readme.index("\n## Results")
    return readme[start : readme.index("\n## ", start + 1)]


def test_every_number_in_the_readme_results_is_a_number_of_the_report():
    """Decimals anywhere in the section and counts in its tables: the facts of the dataset in prose
    (15,677 items) are not results."""
    report = (ROOT / "docs" / "benchmarks.md").read_text()
    section = results_section((ROOT / "README.md").read_text())
    prose = re.sub(r"`[^`]*`|\]\([^)]*\)", "", section)  # commands and link targets are not results
    numbers = re.findall(r"(?<![\w.^])\d+\.\d+(?!\.\d)", prose)  # not versions (2.13.0)
    for row in (line for line in prose.splitlines() if line.startswith("|")):
        numbers += re.findall(r"(?<![\w.^])\d{1,3}(?:,\d{3})+", row)
    assert len(numbers) > 50, "the README's results section shows hardly any numbers"
    report_numbers = set(re.findall(r"\d+(?:,\d{3})*(?:\.\d+)?", report))
    untraced = sorted({n for n in numbers if n not in report_numbers})
    assert not untraced, f"README numbers found in no table of docs/benchmarks.md: {untraced}"


def test_renderers_show_a_stream_file_as_its_benchmark_wrote_it(tmp_path):
    row = {
        "method": "fpocmh",
        "bits": 64,
        "runs": 3,
        "i2t": 0.8,
        "i2t_sd": 0.001,
        "t2i": 0.7,
        "t2i_sd": 0.002,
        "i2t_rehashed": 0.79,
        "t2i_rehashed": 0.7,
        "total_seconds": 12.5,
    }
    doc = {"over_seeds": [row], "targets": [{"method": "fpocmh", "target": "t", "met": False, "detail": "d"}]}
    lines = tables.stream(doc)
    assert "| FPO-CMH | 64 | 3 | 0.8000 ± 0.0010 | 0.7000 ± 0.0020 |" in lines[2]
    assert "+0.0100 / +0.0000" in lines[2]
    assert any("**not met**" in line for line in lines)


def test_bench_all_runs_an_entry_and_writes_its_file_and_the_report_beside_it(tmp_path):
    results, report = tmp_path / "results", tmp_path / "benchmarks.md"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fpocmh",
            "bench",
            "all",
            "--only",
            "quick/offline_b64_seed0",
            "--quiet",
            "--results",
            str(results),
            "--logs",
            str(tmp_path / "logs"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "about 1 min" in proc.stdout and "ok   quick/offline_b64_seed0" in proc.stdout + proc.stderr
    doc = json.loads((results / "quick" / "offline_b64_seed0.json").read_text())
    assert doc["command"].startswith("fpocmh bench offline --bits 64 --seed 0")
    text = report.read_text()
    assert "### Offline hashing, 64 bits, seed 0" in text
    assert f"{doc['results'][0]['i2t']:.4f}" in text
