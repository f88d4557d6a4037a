"""Debian's ``prometheus`` scrapes a real ``fpocmh run``, and the dashboards' queries answer from it.

Needs the ``prometheus`` and ``promtool`` binaries (``apt-get install prometheus``; ``.ci/run`` installs
them). A missing binary fails these tests with that instruction; it never skips them.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("render_dashboards", ROOT / "scripts" / "render_dashboards.py")
render_dashboards = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(render_dashboards)

pytestmark = pytest.mark.broker

# A short run, still through every role: one chunk, a replay slow enough for several scrapes, and a
# small untrained DLCH version 0 (this test is about the metrics, not the method).
RUN_ARGS = (
    "--quiet",
    "--rate",
    "3000",
    "--set",
    "run.latency_probes=50",
    "--set",
    "method=dlch",
    "--set",
    "learner.bootstrap_overrides={original.epochs: 0, hidden: [64], label_hidden: [64]}",
)
RUN_ENV = {"FPOCMH_P1__N_CHUNKS": "1"}
RUN_TIMEOUT_S = 240


def require(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.fail(f"{binary} is not installed; {render_dashboards.INSTALL_HINT}", pytrace=False)
    return path


@dataclass(frozen=True)
class RecordedRun:
    prom: render_dashboards.Prometheus
    start: float
    end: float
    summary: dict

    @property
    def window(self) -> str:
        return f"{math.ceil(self.end - self.start)}s"

    def value(self, expr: str) -> list[tuple[dict[str, str], float]]:
        """An instant query at the end of the run: (labels, value) per series."""
        data = self.prom.api("query", query=expr, time=self.end)
        return [(r["metric"], float(r["value"][1])) for r in data["result"]]

    def series(self, expr: str) -> list[dict[str, str]]:
        """The label sets a range query over the whole run returns, as Grafana would draw them."""
        query = render_dashboards.promql(expr, step=1.0)
        data = self.prom.api("query_range", query=query, start=self.start, end=self.end, step=1.0)
        return [r["metric"] for r in data["result"]]


@pytest.fixture(scope="module")
def recorded(benchmark_path, tmp_path_factory) -> Iterator[RecordedRun]:
    require("prometheus")
    work = tmp_path_factory.mktemp("fpocmh-run")
    ports = {section: render_dashboards.free_port() for section in render_dashboards.ROLE_SECTIONS}
    run_args = [*RUN_ARGS, "--data", str(benchmark_path), "--set", f"run.work_dir={work}"]
    argv = render_dashboards.run_argv([*run_args, "--json", str(work / "summary.json")], ports)
    env = {**os.environ, **RUN_ENV}
    with render_dashboards.Prometheus([f"127.0.0.1:{port}" for port in ports.values()]) as prom:
        start = time.time()
        proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        end = time.time()
        assert proc.returncode == 0, f"fpocmh run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        print(proc.stdout)
        yield RecordedRun(prom, start, end, json.loads((work / "summary.json").read_text()))


def test_prometheus_config_of_the_stack_is_valid():
    result = subprocess.run(
        [require("promtool"), "check", "config", str(ROOT / "deploy/prometheus/prometheus.yml")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scraped_every_role_of_the_run(recorded):
    up = recorded.value(f"max_over_time(up[{recorded.window}])")
    assert len(up) == len(render_dashboards.ROLE_SECTIONS)
    assert all(value == 1 for _, value in up), up


def test_items_consumed_rate_and_count_come_from_the_encoder(recorded):
    from consumers import settings

    topic = settings.load().topics.arrivals
    arrivals = f'fpocmh_messages_consumed_total{{role="encoder", topic="{topic}"}}'
    ((_, rate),) = recorded.value(f"sum(rate({arrivals}[{recorded.window}]))")
    assert rate > 0
    # At-least-once: every replayed arrival was consumed, a redelivery may add a few. (The roles have
    # exited, so their series are stale at the end: take the last value over the run.)
    ((_, consumed),) = recorded.value(f"sum(max_over_time({arrivals}[{recorded.window}]))")
    assert consumed >= recorded.summary["arrivals"]


def test_query_latency_quantiles_come_from_the_query_consumer(recorded):
    buckets = f'rate(fpocmh_query_duration_seconds_bucket{{role="query"}}[{recorded.window}])'
    quantiles = [recorded.value(f"histogram_quantile({q}, sum by (le) ({buckets}))") for q in (0.5, 0.99)]
    (((_, p50),), ((_, p99),)) = quantiles
    assert 0 < p50 <= p99 and math.isfinite(p99)


def test_every_dashboard_metric_is_exported_by_the_running_roles(recorded):
    metadata = recorded.prom.api("metadata")
    served = render_dashboards.series_names((name, entries[0]["type"]) for name, entries in metadata.items())
    for name, dashboard in render_dashboards.load_dashboards().items():
        assert render_dashboards.unknown_metrics(dashboard, served) == [], f"{name}.json"


def test_every_panel_query_runs_and_its_legend_labels_exist(recorded):
    sampled = set(recorded.prom.api("label/__name__/values"))
    for name, dashboard in render_dashboards.load_dashboards().items():
        for panel, target in render_dashboards.panel_targets(dashboard):
            where = f"{name}.json: {panel['title']}: {target['expr']}"
            result = recorded.series(target["expr"])
            if render_dashboards.metric_names(target["expr"]) <= sampled:
                assert result, f"{where}: no data although its metrics were scraped"
            for labels in result:
                wanted = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
                assert wanted <= set(labels), f"{where}: legend needs {wanted - set(labels)}"


def test_the_renderer_draws_one_picture_per_dashboard(recorded, tmp_path):
    paths = render_dashboards.render_all(recorded.prom.url, recorded.start, recorded.end, tmp_path)
    assert sorted(p.name for p in paths) == [f"dashboard_{n}.png" for n in ("learner", "overview", "retrieval")]
    assert all(p.stat().st_size > 10_000 for p in paths)
