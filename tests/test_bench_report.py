"""Seeds in the benchmarks: ``--seed`` / ``--seeds``, mean and sd per cell, differences paired by seed."""

from __future__ import annotations

import argparse

import pytest

from fpocmh_core.bench import report, stream, stream_summary


def parse(*argv: str, multi_seed: bool = True) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    report.add_common_arguments(parser, multi_seed=multi_seed)
    return parser.parse_args(argv)


def test_seed_and_seeds_pick_the_runs_and_exclude_each_other():
    assert report.seeds(parse()) == [0]
    assert report.seeds(parse("--seed", "4")) == [4]
    assert report.seeds(parse("--seeds", "2", "0", "1", "0")) == [2, 0, 1]
    with pytest.raises(SystemExit):
        parse("--seed", "1", "--seeds", "0", "1")
    assert report.seeds(parse("--seed", "3", multi_seed=False)) == [3]
    with pytest.raises(SystemExit):
        parse("--seeds", "0", "1", multi_seed=False)


def test_aggregate_gives_mean_and_sample_sd_per_key_in_first_seen_order():
    rows = [
        {"method": "b", "seed": 0, "x": 1.0},
        {"method": "a", "seed": 0, "x": 5.0},
        {"method": "b", "seed": 1, "x": 3.0},
    ]
    cells = report.aggregate(rows, ("method",), ("x",))
    assert [c["method"] for c in cells] == ["b", "a"]
    assert cells[0] == {"method": "b", "runs": 2, "x": 2.0, "x_sd": pytest.approx(2**0.5)}
    assert cells[1]["x_sd"] == 0.0 and cells[1]["runs"] == 1
    assert report.format_mean_sd(cells[0], "x") == "2.0000 ± 1.4142"
    assert report.format_mean_sd(cells[1], "x") == "5.0000"


def test_differences_are_paired_by_seed_and_compared_with_two_sd():
    # b is always 0.01 above a, while both vary by far more across seeds: paired, the difference is clear.
    rows = [{"m": "a", "seed": s, "v": base} for s, base in enumerate((0.5, 0.7, 0.6))]
    rows += [{"m": "b", "seed": s, "v": base + 0.01 + 0.001 * s} for s, base in enumerate((0.5, 0.7, 0.6))]
    diff = report.paired_difference(rows, "m", "b", "a", ("seed",), "v")
    assert diff.mean == pytest.approx(0.011) and diff.runs == 3 and diff.exceeds_2sd
    assert "(> 2 sd)" in str(diff)
    noisy = report.paired_difference(rows, "m", "a", "a", ("seed",), "v")
    assert noisy.mean == 0.0 and not noisy.exceeds_2sd
    single = report.paired_difference(rows[:1] + rows[3:4], "m", "b", "a", ("seed",), "v")
    assert not single.exceeds_2sd and "sd)" not in str(single)
    with pytest.raises(ValueError, match="no runs"):
        report.paired_difference(rows, "m", "b", "c", ("seed",), "v")


def final_record(method: str, seed: int, i2t: float, rehashed: float) -> list[dict]:
    """The per-chunk P1 records of one method and seed: two chunks, the last one decides."""
    last = {"i2t": i2t, "t2i": i2t, "i2t_rehashed": rehashed, "t2i_rehashed": rehashed, "drift": 0.0}
    last |= {"i2t_new": None, "t2i_new": None, "i2t_old": i2t, "t2i_old": i2t}
    first = {k: 0.0 for k in last}
    return [
        {"method": method, "seed": seed, "chunk": c, "seconds": 1.0, "items": 500, **values}
        for c, values in ((0, first), (1, last))
    ]


def test_stream_seed_summary_reports_the_last_chunk_fpocmh_differences_and_targets():
    results = []
    for seed, noise in enumerate((0.0, 0.002, -0.001)):
        results += final_record("frozen", seed, 0.70 + noise, 0.70 + noise)
        results += final_record("fpocmh", seed, 0.72 + noise, 0.73 + noise)
    cells, targets, lines = stream_summary.summary(results)
    text = "\n".join(lines)
    assert "0.7003 ± 0.0015" in text  # frozen's mean and sd over the three seeds, after the last chunk
    # Per method: 2 learner seconds summed over the two chunks, and 2 ms per arrival over their 1,000 arrivals.
    assert text.count("2.0000 ± 0.0000") == 4
    assert "fpocmh - frozen, stored codes, all queries: I->T +0.0200 ± 0.0000 (> 2 sd)" in text
    assert "new" not in " ".join(lines[:2]), "P1 has no new-label queries to score"
    assert "naive" not in text
    met = {t["target"]: t["met"] for t in targets}
    assert met == {
        "all queries: - frozen >= -0.005": True,
        "|stored - re-hashed| <= 0.005": False,  # 0.01 apart on every seed
        "time < 5% of full retraining": None,
    }
    assert [c["method"] for c in cells] == ["frozen", "fpocmh"]


def test_stream_takes_the_protocol_and_shares_from_the_command_line(mirflickr):
    parser = argparse.ArgumentParser()
    stream.add_arguments(parser)
    args = parser.parse_args(["--offline-share", "0.05", "--seeds", "0", "1"])
    p1 = stream._stream(args, mirflickr, 1)
    assert (p1.name, p1.config.offline_share, p1.config.seed) == ("p1", 0.05, 1)
    assert stream._stream(parser.parse_args([]), mirflickr, 0).config.offline_share == 0.3
    p3 = stream._stream(parser.parse_args(["--protocol", "p3", "--chunks", "4", "--new-chunks", "2"]), mirflickr, 0)
    assert (p3.config.n_chunks, p3.config.new_chunks) == (4, 2)
    assert p3.split.query_new.any() and not p1.split.query_new.any()
