"""What ``fpocmh bench stream`` prints after the last chunk: per method mean ± sd over seeds, the online
learners' differences paired by seed, and the P3 targets checked (reported, never asserted)."""

from __future__ import annotations

from typing import Any

from fpocmh_core.bench import report

SCORES = ("i2t", "t2i", "i2t_new", "t2i_new", "i2t_old", "t2i_old")
STABILITY = ("i2t_rehashed", "t2i_rehashed", "drift", "total_seconds", "stream_ms_per_item")
ONLINE = ("fpocmh", "dlch")
BASELINES = ("frozen", "naive", "retrain")
DIRECTIONS = (("I->T", "i2t"), ("T->I", "t2i"))
QUERIES = {"": "all queries", "new": "queries with new labels", "old": "queries without new labels"}
# The P3 targets (issue 12): gain on new-label queries, loss on the others, stored vs re-hashed, cost.
MIN_NEW_GAIN, MAX_OLD_LOSS, MAX_REHASH_GAP, MAX_COST_SHARE = 0.03, 0.005, 0.005, 0.05


def final_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method and seed: the last chunk's record, with the learner's seconds (and ms per arrival) over
    the whole stream."""
    last = max(r["chunk"] for r in results)
    seconds: dict[tuple[str, int], float] = {}
    items: dict[tuple[str, int], int] = {}
    for r in results:
        key = r["method"], r["seed"]
        seconds[key] = seconds.get(key, 0.0) + r["seconds"]
        items[key] = items.get(key, 0) + r["items"]
    return [
        {
            **r,
            "total_seconds": seconds[r["method"], r["seed"]],
            "stream_ms_per_item": 1000.0 * seconds[r["method"], r["seed"]] / max(items[r["method"], r["seed"]], 1),
        }
        for r in results
        if r["chunk"] == last
    ]


def _groups(final: list[dict[str, Any]]) -> list[str]:
    """Query groups with scores: all, and new / old when some query carries a new label."""
    return ["", "new", "old"] if final[0]["i2t_new"] is not None else [""]


def _key(direction: str, group: str) -> str:
    return f"{direction}_{group}" if group else direction


def _differences(final: list[dict[str, Any]], a: str, b: str, group: str) -> list[report.Difference]:
    return [report.paired_difference(final, "method", a, b, ("seed",), _key(d, group)) for _, d in DIRECTIONS]


def targets(final: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each online learner against the P3 targets, on the mean over seeds; ``better`` marks the learner
    with the higher mean new-label mAP (all queries on P1), the one the targets are about."""
    methods = {r["method"] for r in final}
    online = [m for m in ONLINE if m in methods]
    if not online or "frozen" not in methods:
        return []
    groups = _groups(final)
    group = "new" if "new" in groups else ""

    def score(method: str) -> float:
        values = [r[_key(d, group)] for r in final if r["method"] == method for _, d in DIRECTIONS]
        return sum(values) / len(values)

    better = max(online, key=score)
    retrain_seeds = {r["seed"] for r in final if r["method"] == "retrain"}
    found = []
    for m in online:
        checks: list[tuple[str, bool | None, str]] = []
        if group:
            gains = _differences(final, m, "frozen", "new")
            detail = f"I->T {gains[0]}, T->I {gains[1]}"
            checks.append(
                (f"{QUERIES['new']}: - frozen >= {MIN_NEW_GAIN}", all(g.mean >= MIN_NEW_GAIN for g in gains), detail)
            )
        old = "old" if group else ""
        losses = _differences(final, m, "frozen", old)
        checks.append(
            (
                f"{QUERIES[old]}: - frozen >= -{MAX_OLD_LOSS}",
                all(d.mean >= -MAX_OLD_LOSS for d in losses),
                f"I->T {losses[0]}, T->I {losses[1]}",
            )
        )
        gaps = [
            report.mean_sd([abs(r[d] - r[f"{d}_rehashed"]) for r in final if r["method"] == m]) for _, d in DIRECTIONS
        ]
        checks.append(
            (
                f"|stored - re-hashed| <= {MAX_REHASH_GAP}",
                all(mean <= MAX_REHASH_GAP for mean, _ in gaps),
                ", ".join(
                    f"{name} {mean:.4f} ± {sd:.4f}" for (name, _), (mean, sd) in zip(DIRECTIONS, gaps, strict=True)
                ),
            )
        )
        if retrain_seeds:
            own = sum(r["total_seconds"] for r in final if r["method"] == m and r["seed"] in retrain_seeds)
            full = sum(r["total_seconds"] for r in final if r["method"] == "retrain")
            share = own / full
            detail = f"{own:.1f} s vs retraining's {full:.1f} s = {100 * share:.2f}% (seeds {sorted(retrain_seeds)})"
            checks.append((f"time < {100 * MAX_COST_SHARE:.0f}% of full retraining", share < MAX_COST_SHARE, detail))
        else:
            checks.append((f"time < {100 * MAX_COST_SHARE:.0f}% of full retraining", None, "no retrain arm in the run"))
        found += [
            {"method": m, "better": m == better, "target": text, "met": met, "detail": detail}
            for text, met, detail in checks
        ]
    return found


def summary(results: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    """(mean ± sd cells per method, targets, printed lines) after the last chunk of one code length."""
    final = final_rows(results)
    scores = [_key(d, g) for g in _groups(final) for _, d in DIRECTIONS]
    cells = report.aggregate(final, ("method",), (*scores, *STABILITY))
    lines = []
    for values in (scores, STABILITY):
        rows = [
            {"method": c["method"], "seeds": c["runs"], **{v: report.format_mean_sd(c, v) for v in values}}
            for c in cells
        ]
        lines.append(report.format_table(rows, ("method", "seeds", *values)))
    methods = [c["method"] for c in cells]
    for a in (m for m in ONLINE if m in methods):
        for b in (m for m in (*BASELINES, *ONLINE) if m in methods and m != a):
            if a == "dlch" and b == "fpocmh":
                continue  # already shown as fpocmh - dlch
            for group in _groups(final):
                diffs = _differences(final, a, b, group)
                lines.append(f"{a} - {b}, stored codes, {QUERIES[group]}: I->T {diffs[0]}, T->I {diffs[1]}")
    found = targets(final)
    if found:
        lines.append("targets (reported, not asserted; mean over seeds):")
        for t in found:
            verdict = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
            mark = " (the better online learner)" if t["better"] else ""
            lines.append(f"  {t['method']}{mark}: {t['target']}: {verdict} ({t['detail']})")
    return cells, found, lines
