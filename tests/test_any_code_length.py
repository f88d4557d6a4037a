"""Any dataset, any code length, any number of seeds: a small synthetic dataset whose text features (16-d
topic vectors) have fewer dimensions than the 64-bit codes asked for. CCA cannot give more canonical
directions than that and is reported as not applicable; every other method runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from synthetic import IMAGE_DIMS, TEXT_DIMS, write_topic_dataset

from fpocmh.cli import main
from fpocmh_core.baselines import CCAHasher


@pytest.fixture(scope="module")
def topic_dataset(tmp_path_factory) -> Path:
    return write_topic_dataset(tmp_path_factory.mktemp("topics") / "topics.npz")


def test_cca_names_the_limit_it_hits_and_refuses_to_fit_beyond_it():
    reason = CCAHasher.not_applicable(64, IMAGE_DIMS, TEXT_DIMS, 150)
    assert reason == "64 bits exceed CCA's 16 canonical directions (at most the 16 text dims)"
    assert CCAHasher.not_applicable(16, IMAGE_DIMS, TEXT_DIMS, 150) is None
    assert "at most the 40 pairs" in CCAHasher.not_applicable(64, IMAGE_DIMS, 512, 40)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="16 text dims"):
        CCAHasher(64).fit(rng.normal(size=(150, IMAGE_DIMS)), rng.normal(size=(150, TEXT_DIMS)))


def test_bench_offline_reports_cca_not_applicable_at_64_bits_runs_the_rest_and_averages_seeds(
    topic_dataset, tmp_path, capsys
):
    out = tmp_path / "offline.json"
    argv = ["bench", "offline", "--data", str(topic_dataset), "--bits", "16", "64", "--seeds", "0", "1"]
    assert main([*argv, "--set", "epochs=2", "--quiet", "--threads", "1", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    rows = {(r["method"], r["bits"], r["seed"]): r for r in doc["results"]}
    assert len(rows) == 8
    for seed in (0, 1):
        assert "16 text dims" in rows[("cca", 64, seed)]["not_applicable"]
        assert "i2t" not in rows[("cca", 64, seed)]
        for cell in (("cca", 16), ("offline", 16), ("offline", 64)):
            assert 0 < rows[(*cell, seed)]["i2t"] <= 1
    assert rows[("offline", 64, 0)]["i2t"] != rows[("offline", 64, 1)]["i2t"], "each seed its own split and init"
    cells = {(c["method"], c["bits"]): c for c in doc["over_seeds"]}
    assert set(cells) == {("offline", 16), ("offline", 64), ("cca", 16)}
    offline64 = cells[("offline", 64)]
    assert offline64["runs"] == 2
    seeds_i2t = [rows[("offline", 64, s)]["i2t"] for s in (0, 1)]
    assert offline64["i2t"] == pytest.approx(np.mean(seeds_i2t))
    assert offline64["i2t_sd"] == pytest.approx(np.std(seeds_i2t, ddof=1))
    assert "cca at 64 bits: not applicable: 64 bits exceed CCA's 16 canonical directions" in capsys.readouterr().out


def test_bench_lifelong_runs_at_64_bits_on_16_dim_text_and_pairs_differences_by_seed(topic_dataset, tmp_path):
    out = tmp_path / "lifelong.json"
    small = ["original.epochs=1", "lifelong.epochs=1", "lifelong.omega=100", "lifelong.reservoir=100"]
    small += ["hidden=[64]", "label_hidden=[64]"]
    argv = ["bench", "lifelong", "--data", str(topic_dataset), "--bits", "64", "--seeds", "0", "1"]
    argv += ["--methods", "dlch", "frozen", "--quiet", "--json", str(out), "--set", *small]
    assert main(argv) == 0
    doc = json.loads(out.read_text())
    assert sorted({(r["method"], r["seed"]) for r in doc["results"]}) == [
        (m, s) for m in ("dlch", "frozen", "original") for s in (0, 1)
    ]
    dlch = next(c for c in doc["over_seeds"] if c["method"] == "dlch" and c["increment"] == 1)
    assert dlch["runs"] == 2 and {"i2t_new", "i2t_new_sd", "t2i_old_sd"} <= set(dlch)
    assert any(
        line.startswith("bits 64 increment 1: dlch - frozen on new-label queries: I->T ") and "2 sd" in line
        for line in doc["paired_differences"]
    )
    assert doc["protocol"]["seed"] == [0, 1]
