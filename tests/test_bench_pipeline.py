"""``fpocmh bench pipeline`` end to end at a small scale against the test broker: every measure the
README reports lands in the JSON, with the shape the issue asks for."""

from __future__ import annotations

import json

import pytest

from fpocmh import cli

pytestmark = pytest.mark.broker


def test_the_pipeline_benchmark_reports_ingest_bounds_scaling_and_query_latency(kafka_bootstrap, tmp_path):
    out = tmp_path / "bench.json"
    argv = ["bench", "pipeline", "--bootstrap", kafka_bootstrap, "--items", "3000", "--sizes", "1000", "3000"]
    argv += ["--probes", "10", "--repeats", "1", "--quiet", "--work-dir", str(tmp_path), "--json", str(out)]
    assert cli.main(argv) == 0
    report = json.loads(out.read_text())
    for key in ("ingest_items_per_s", "encoder_items_per_s", "broker_items_per_s", "two_encoder_ratio"):
        assert report[key] > 0, key
    assert [row["codes"] for row in report["query"]] == [1000, 3000]
    for row in report["query"]:
        assert 0 < row["p50_ms"] <= row["p99_ms"]
        assert row["inprocess_ms"] > 0 and row["bound_ms"] > 0
    # Each size has a store of its own: the bound grows with the codes scanned.
    assert report["query"][1]["bound_ms"] == pytest.approx(3 * report["query"][0]["bound_ms"])
