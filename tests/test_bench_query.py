"""``fpocmh bench query`` end to end at a small scale against the test broker, with the multi-index and
codes of the offline model: the shards answer exactly what one flat store does, and the JSON says which
index and which codes it measured."""

from __future__ import annotations

import json

import pytest

from fpocmh import cli

pytestmark = pytest.mark.broker


def test_the_query_benchmark_measures_a_multi_index_tier_on_learned_codes(kafka_bootstrap, tmp_path):
    out = tmp_path / "bench.json"
    argv = ["bench", "query", "--bootstrap", kafka_bootstrap, "--sizes", "2e4", "--shards", "1", "2"]
    argv += ["--index", "mih", "--codes", "learned", "--probes", "20", "--repeats", "1", "--quiet"]
    argv += ["--work-dir", str(tmp_path), "--json", str(out)]
    assert cli.main(argv) == 0
    report = json.loads(out.read_text())
    assert (report["index"], report["codes"]) == ("mih", "learned")
    assert [(r["shards"], r["index"], r["source"]) for r in report["rounds"]] == [
        (1, "mih", "learned"),
        (2, "mih", "learned"),
    ]
    for row in report["rounds"]:
        assert row["merge_equal"], "the multi-index shards' merged answers equal one flat store's"
        assert row["answers_lost"] == 0 and 0 < row["p50_ms"] <= row["p99_ms"]
    size = report["sizes"]["20000"]
    assert size["catchup_codes_per_s"] > 0 and size["restart_seconds"] is not None, (
        "a shard restarted from its snapshot"
    )
