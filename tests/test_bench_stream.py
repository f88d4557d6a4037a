"""``fpocmh bench stream`` on the real benchmark file with tiny settings: P3 with DLCH beside the
baselines, the queries with and without new labels scored apart, and P1 where no query has a new label."""

from __future__ import annotations

import json

import pytest

from fpocmh.cli import main

FIELDS = (
    "method",
    "bits",
    "seed",
    "chunk",
    "i2t",
    "t2i",
    "i2t_rehashed",
    "t2i_rehashed",
    "i2t_new",
    "t2i_new",
    "i2t_old",
    "t2i_old",
    "seconds",
)
TINY = [
    "--bits",
    "16",
    "--offline-share",
    "0.6",
    "--quiet",
    "--threads",
    "1",
    "--batch",
    "1024",
    "--offline-set",
    "epochs=1",
    "--dlch-set",
    "original.epochs=1",
    "lifelong.epochs=1",
    "lifelong.omega=200",
]


def run_bench(tmp_path, *argv: str) -> dict:
    out = tmp_path / "stream.json"
    assert main(["bench", "stream", *argv, *TINY, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_p3_scores_queries_with_and_without_new_labels_apart_and_runs_dlch(tmp_path, capsys):
    doc = run_bench(
        tmp_path,
        *("--protocol", "p3", "--chunks", "2", "--new-chunks", "1", "--methods", "frozen", "retrain", "dlch"),
    )
    records = doc["results"]
    assert all(all(f in r for f in FIELDS) for r in records)
    assert {r["method"] for r in records} == {"frozen", "retrain", "dlch"}
    assert len(records) == 3 * 3  # before the stream and after each of the two chunks
    n_new = doc["new_queries"]
    assert 0 < n_new < 2000
    share = n_new / 2000
    for r in records:
        for d in ("i2t", "t2i"):
            # The overall mAP is the mean over all queries, so the two groups' means weigh in by their size.
            assert r[d] == pytest.approx(share * r[f"{d}_new"] + (1 - share) * r[f"{d}_old"], abs=1e-9)
            assert 0 < r[f"{d}_new"] <= 1 and 0 < r[f"{d}_old"] <= 1
    last = {r["method"]: r for r in records if r["chunk"] == 1}
    dlch, frozen = last["dlch"], last["frozen"]
    assert dlch["seconds"] > 0 and dlch["items"] > 0
    # DLCH's increment codes are DCC's, not its networks': a re-hash would change some stored bits.
    assert dlch["drift"] > 0
    assert frozen["drift"] == 0 and frozen["i2t"] == frozen["i2t_rehashed"]
    targets = {t["target"]: t for t in doc["targets"] if t["method"] == "dlch"}
    assert len(targets) == 4
    assert "(seeds [0])" in targets["time < 5% of full retraining"]["detail"]
    assert doc["retrain_seeds"] == [0] and doc["complete"]
    out = capsys.readouterr().out
    assert "dlch - frozen, stored codes, queries with new labels: I->T" in out
    assert "targets (reported, not asserted; mean over seeds):" in out


def test_p1_has_no_new_label_queries_and_retrains_on_the_asked_seeds_only(tmp_path):
    doc = run_bench(
        tmp_path,
        *("--protocol", "p1", "--chunks", "2", "--methods", "frozen", "retrain"),
        *("--seeds", "0", "1", "--retrain-seeds", "1"),
    )
    assert doc["new_queries"] == 0
    for r in doc["results"]:
        assert r["i2t_new"] is None and r["t2i_new"] is None
        assert (r["i2t_old"], r["t2i_old"]) == (r["i2t"], r["t2i"])
    assert {(r["method"], r["seed"]) for r in doc["results"]} == {("frozen", 0), ("frozen", 1), ("retrain", 1)}
    assert doc["retrain_seeds"] == [1]
    assert doc["targets"] == []  # neither online learner in the run
