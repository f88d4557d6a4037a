"""The query tier's commands: words to features over the benchmark's tag vocabulary, session bounds on
the command line, shard arguments, a query in words through the tier, and ``fpocmh bench query`` end
to end at a small scale."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pipeline_support import RoleThread, model_state, paired_items, produce_arrivals, publish, wait_until

from consumers import settings
from consumers.encoder.role import run_encoder
from consumers.query.client import QueryClient
from consumers.query.role import run_query
from fpocmh import cli
from fpocmh.commands.query import parse_after, tag_vocabulary, words_to_features


def test_words_become_the_bag_of_words_of_the_tag_vocabulary_and_unknown_words_are_reported(benchmark_path):
    vocab, tags = tag_vocabulary(benchmark_path)
    assert len(vocab) == 1386 and len(tags) == 15677
    features, unknown = words_to_features("Sunset beach, clouds qwertyzzz", vocab)
    assert unknown == ["qwertyzzz"]
    assert sorted(vocab[i] for i in np.flatnonzero(features)) == ["beach", "clouds", "sunset"]


def test_session_offsets_parse_from_the_command_line():
    assert parse_after("0:120, 3:7") == [(0, 120), (3, 7)]
    with pytest.raises(ValueError, match="PARTITION:OFFSET"):
        parse_after("0-120")


def test_serve_queries_takes_a_shard_and_refuses_nonsense(capsys):
    parser = cli.build_parser()
    assert parser.parse_args(["serve-queries", "--shard", "1/2"]).shard == "1/2"
    assert parser.parse_args(["serve-queries"]).shard == "0/1"
    args = parser.parse_args(["run", "--query-shards", "2", "--serve"])
    assert (args.query_shards, args.serve) == (2, True)
    assert cli.main(["serve-queries", "--shard", "two", "--bootstrap", "127.0.0.1:1"]) != 0
    assert "shard 'two': expected s/S" in capsys.readouterr().err


@pytest.mark.broker
def test_the_query_benchmark_reports_every_measure_the_issue_asks_for(kafka_bootstrap, tmp_path):
    out = tmp_path / "bench.json"
    argv = ["bench", "query", "--bootstrap", kafka_bootstrap, "--sizes", "3000", "--shards", "1", "2"]
    argv += ["--probes", "5", "--repeats", "1", "--work-dir", str(tmp_path), "--json", str(out)]
    assert cli.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["merge_equal"] is True
    # Resident growth of a 3,000-code store can hide in memory the process already holds: only >= 0 here.
    assert report["bytes_per_code"] >= 0 and report["catchup_codes_per_s"] > 0 and report["restart_seconds"] > 0
    assert [(r["codes"], r["shards"]) for r in report["rounds"]] == [(3000, 1), (3000, 2)]
    for row in report["rounds"]:
        assert 0 < row["p50_ms"] <= row["p99_ms"] and 0 < row["search_ms"] <= row["search_p99_ms"]
        assert 0 < row["bare_p50_ms"] <= row["bare_p99_ms"]  # the host's floor, measured on the same probes
    assert set(report["bare_p99_two_over_one"]) == set(report["p99_two_over_one"]) == {"3000"}


@pytest.mark.broker
def test_a_query_in_words_prints_ranked_items_with_their_tags_and_labels(pipeline_cfg, mirflickr, tmp_path, capsys):
    publish(pipeline_cfg, model_state(mirflickr.dims, pipeline_cfg.bits))
    config = settings.dump(pipeline_cfg, tmp_path / "pipeline.yaml")
    with (
        RoleThread(run_encoder, pipeline_cfg),
        RoleThread(run_query, pipeline_cfg),
        QueryClient(pipeline_cfg) as client,
    ):
        produce_arrivals(pipeline_cfg, paired_items(mirflickr.image, mirflickr.text, range(200)))
        wait_until_stored(client, 200)
        code = cli.main(["query", "--config", str(config), "--text", "sunset beach qwertyzzz", "-k", "3"])
    out = capsys.readouterr().out
    assert code == 0
    assert "unknown words (not in the 1386-tag vocabulary, left out): qwertyzzz" in out
    ranked = [line for line in out.splitlines() if line.strip()[:2] in ("1.", "2.", "3.")]
    assert len(ranked) == 3 and all("tags:" in line and "labels:" in line for line in ranked)


def wait_until_stored(client, n):
    def holding():
        try:
            return client.status(timeout_s=3).store_codes[1] >= n
        except TimeoutError:
            return False

    wait_until(holding, 60, f"{n} text codes")
