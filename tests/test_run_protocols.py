"""``fpocmh run --protocol p2|p3`` end to end on the embedded broker, with either learner.

Each run replays a small dataset so that the whole pipeline (broker, version 0, learner, encoder, query
consumer, live scoring) finishes in seconds: a slice of the benchmark file (200 queries, 1,000 database
items), or the synthetic topic-vector dataset whose 16-d text features are shorter than the 64-bit
codes. Version 0 is trained for one epoch on small networks, since quality is not under test here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from synthetic import write_topic_dataset

from fpocmh_core.data import load_dataset
from fpocmh_core.protocols import load_stream

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL_ENV = {"FPOCMH_P3__N_CHUNKS": "2", "FPOCMH_P3__NEW_CHUNKS": "1"}
TINY_BOOTSTRAP = {
    "dlch": "{original.epochs: 1, hidden: [64], label_hidden: [64], lifelong.epochs: 1, lifelong.omega: 200, "
    "lifelong.reservoir: 200}",
    "fpocmh": "{offline: {epochs: 1, hidden: [64]}}",
}


@pytest.fixture(scope="module")
def topic_dataset(tmp_path_factory) -> Path:
    return write_topic_dataset(tmp_path_factory.mktemp("topics") / "topics.npz")


@pytest.fixture(scope="module")
def benchmark_slice(benchmark_path, tmp_path_factory) -> Path:
    """The first 200 query rows and 1,000 database rows of the benchmark, as a file of its own."""
    src = np.load(benchmark_path)
    split = src["split"]
    rows = np.sort(np.concatenate([np.flatnonzero(split == 1)[:200], np.flatnonzero(split == 0)[:1000]]))
    path = tmp_path_factory.mktemp("data") / "small.npz"
    np.savez(
        path, label_names=src["label_names"], **{k: src[k][rows] for k in ("img_feat", "txt_feat", "labels", "split")}
    )
    return path


def run_pipeline(protocol: str, method: str, data: Path, work: Path) -> tuple[subprocess.CompletedProcess, dict]:
    sets = {
        "method": method,
        "learner.bootstrap_overrides": TINY_BOOTSTRAP[method],
        "run.work_dir": str(work),
        "run.latency_probes": "10",
        "learner.publish_every_items": "200",
        **{f"{role}.metrics_port": "0" for role in ("replay", "encoder", "learner", "query")},
    }
    argv = [sys.executable, "-m", "fpocmh", "run", "--protocol", protocol, "--data", str(data), "--quiet"]
    argv += ["--rate", "0", "--json", str(work / "summary.json")]
    argv += [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]
    env = {**os.environ, **PROTOCOL_ENV}
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"fpocmh run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc, json.loads((work / "summary.json").read_text())


@pytest.mark.broker
@pytest.mark.parametrize(
    ("protocol", "method", "dataset"), [("p3", "dlch", "benchmark_slice"), ("p2", "fpocmh", "topic_dataset")]
)
def test_run_replays_the_protocol_and_scores_queries_with_and_without_new_labels(
    protocol, method, dataset, request, tmp_path, monkeypatch
):
    for key, value in PROTOCOL_ENV.items():
        monkeypatch.setenv(key, value)
    data = request.getfixturevalue(dataset)
    ds = load_dataset(data)
    stream = load_stream(ds, protocol)
    split = stream.split
    stream_arrivals = sum(len(stream.chunk_records(ds, c)) for c in range(len(split.chunks)))

    proc, summary = run_pipeline(protocol, method, data, tmp_path)

    assert summary["protocol"] == protocol
    assert summary["arrivals"] == split.offline.size + stream_arrivals
    assert len(summary["chunks"]) == 1 + len(split.chunks), "the offline part and every chunk scored live"
    stored = summary["stored_codes"]
    assert stored["codes"] == 2 * split.database.size, "one stored code per item and modality"
    assert set(stored["codes_by_source"]) <= {"encoder", "learner"}
    assert sum(stored["codes_by_source"].values()) == stored["codes"], "each stored code counted by who wrote it"
    assert summary["model_versions_published"] >= 2, "the learner published versions beyond version 0"
    share = split.query_new.mean()
    for direction in ("i2t", "t2i"):
        for scores in (stored, summary["live_map_at_k"]):
            assert 0 < scores[f"{direction}_new"] <= 1 and 0 < scores[f"{direction}_old"] <= 1
        # Full-ranking mAP is a mean over queries: the two groups make up the whole query set.
        whole = share * stored[f"{direction}_new"] + (1 - share) * stored[f"{direction}_old"]
        assert stored[direction] == pytest.approx(whole, abs=1e-9)
    assert "new-label queries" in proc.stdout and f"summary ({protocol})" in proc.stdout


def test_the_arrival_shares_are_refused_for_p2_with_the_flags_named(mirflickr):
    import argparse

    from fpocmh.commands.replay import load_protocol

    args = argparse.Namespace(protocol="p2", unimodal_share=0.5, label_share=None)
    with pytest.raises(ValueError, match="--unimodal-share: p2 streams paired, labelled increments"):
        load_protocol(args, mirflickr)
    args = argparse.Namespace(protocol="p3", unimodal_share=0.5, label_share=0.2)
    assert load_protocol(args, mirflickr).config.label_share == 0.2


def test_queries_are_scored_in_new_and_old_groups_only_when_the_protocol_has_new_labels():
    from producers.replay import query_groups

    assert list(query_groups(np.zeros(4, dtype=bool))) == ["all"]
    groups = query_groups(np.array([True, False, False, True]))
    assert list(groups) == ["all", "new", "old"]
    assert groups["new"].tolist() == [True, False, False, True] and groups["old"].tolist() == [False, True, True, False]
