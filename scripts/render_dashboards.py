"""Draw every Grafana dashboard's panels from real recorded metrics, without Grafana.

Starts Debian's ``prometheus`` (scraping every second) against the metrics ports of a real
``fpocmh run`` (the run itself and its three role processes), lets the run finish, then evaluates each
panel's PromQL with Prometheus's range API over the time the roles were scraped and draws the panels
with matplotlib on the dashboard's own grid, one PNG per dashboard (``docs/img/dashboard_<name>.png``)::

    python scripts/render_dashboards.py                         # fpocmh run with RUN_ARGS
    python scripts/render_dashboards.py -- --rate 400 --set method=dlch   # other fpocmh run arguments
    python scripts/render_dashboards.py --prometheus http://127.0.0.1:9090 --start T0 --end T1

The tests import this file: :class:`Prometheus`, :func:`panel_targets` and the PromQL helpers.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD_DIR = ROOT / "deploy" / "grafana" / "dashboards"
OUT_DIR = ROOT / "docs" / "img"
SCRAPE_INTERVAL = 1.0
# Sections of config/pipeline.yaml whose metrics_port a ``fpocmh run`` serves: the run itself (replay)
# and its three role processes.
ROLE_SECTIONS = ("replay", "encoder", "learner", "query")
# The ``fpocmh run`` behind the README's pictures (the metrics ports are added).
RUN_ARGS: tuple[str, ...] = ("--quiet", "--rate", "2000")
# Picture geometry in inches: one Grafana grid row, the figure title, and (left, right, top, bottom) panel padding.
ROW_INCHES = 0.42
TITLE_INCHES = 0.5
PAD_INCHES = (0.7, 0.15, 0.3, 0.45)
# Series names each metric type exposes (the text-format suffix rules).
SERIES_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "unknown": ("",),
}
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless"}
PROMQL_KEYWORDS |= {"offset", "inf", "nan", "start", "end"}
INSTALL_HINT = "install it with: apt-get install -y --no-install-recommends prometheus"


class PrometheusError(RuntimeError):
    """Prometheus is missing, did not start, or rejected a query."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load_dashboards(folder: Path = DASHBOARD_DIR) -> dict[str, dict[str, Any]]:
    """``{"overview": <dashboard JSON>, ...}`` for every ``*.json`` in ``folder``."""
    return {path.stem: json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))}


def panel_targets(dashboard: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """Every (panel, target) pair, including panels nested in collapsed rows."""
    for panel in dashboard.get("panels", []):
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []):
                yield inner, target


def series_names(families: Iterable[tuple[str, str]]) -> set[str]:
    """Every series name that metric families, given as (name, type), can expose: sampled or not yet."""
    return {name + suffix for name, kind in families for suffix in SERIES_SUFFIXES[kind]}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, labels, ranges and keywords removed)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", " ", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # range and subquery windows
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)  # label lists
    idents = re.findall(r"(?<![\w.$:])([A-Za-z_:][\w:]*)(?![\w:]|\s*\()", expr)  # not numbers, vars, calls
    return {name for name in idents if name.lower() not in PROMQL_KEYWORDS}


def unknown_metrics(dashboard: dict[str, Any], series: set[str]) -> list[str]:
    """``"<panel title>: <name>"`` for every metric the dashboard's queries select that is not in ``series``."""
    return [
        f"{panel['title']}: {name}"
        for panel, target in panel_targets(dashboard)
        for name in sorted(metric_names(target["expr"]))
        if name not in series
    ]


def promql(expr: str, step: float, scrape_interval: float = SCRAPE_INTERVAL) -> str:
    """Replace Grafana's interval variables the way Grafana does before it sends a query."""
    rate_interval = max(step + scrape_interval, 4 * scrape_interval)
    for name, seconds in (("$__rate_interval", rate_interval), ("$__interval", step)):
        expr = expr.replace(name, f"{int(math.ceil(seconds))}s")
    return expr


class Prometheus:
    """A throw-away Prometheus server on a free local port, scraping ``targets`` every second."""

    def __init__(self, targets: Sequence[str], scrape_interval: float = SCRAPE_INTERVAL) -> None:
        self.targets = list(targets)
        self.scrape_interval = scrape_interval
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._dir = Path(tempfile.mkdtemp(prefix="fpocmh-prometheus-"))
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Prometheus:
        binary = shutil.which("prometheus")
        if binary is None:
            raise PrometheusError(f"the prometheus binary is not on PATH; {INSTALL_HINT}")
        config = {
            "global": {"scrape_interval": f"{self.scrape_interval:g}s", "evaluation_interval": "5s"},
            "scrape_configs": [{"job_name": "fpocmh", "static_configs": [{"targets": self.targets}]}],
        }
        (self._dir / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        self._log = (self._dir / "prometheus.log").open("wb")
        self._proc = subprocess.Popen(
            [
                binary,
                f"--config.file={self._dir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self._dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._wait_ready(timeout=30.0)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._log.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        self._log.flush()
        return "\n".join((self._dir / "prometheus.log").read_text(errors="replace").splitlines()[-lines:])

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise PrometheusError(f"prometheus exited with {self._proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as resp:  # noqa: S310 (local URL)
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise PrometheusError(f"prometheus not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def api(self, path: str, **params: Any) -> Any:
        return api(self.url, path, **params)

    def wait_for_targets_up(self, timeout: float = 30.0) -> None:
        """Block until every target has been scraped successfully once."""
        deadline = time.monotonic() + timeout
        health: dict[str, str] = {}
        while time.monotonic() < deadline:
            active = self.api("targets")["activeTargets"]
            health = {t["scrapeUrl"]: t["health"] for t in active}
            if len(health) == len(self.targets) and all(h == "up" for h in health.values()):
                return
            time.sleep(self.scrape_interval / 2)
        raise PrometheusError(f"targets not up after {timeout:.0f} s: {health}")


def api(url: str, path: str, **params: Any) -> Any:
    """GET ``/api/v1/<path>`` and return its ``data``; an error names the query."""
    query = urllib.parse.urlencode(params)
    try:
        with urllib.request.urlopen(f"{url}/api/v1/{path}?{query}", timeout=30) as resp:  # noqa: S310
            body = json.load(resp)
    except urllib.error.HTTPError as exc:
        body = json.load(exc)
    if body.get("status") != "success":
        raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
    return body["data"]


def legend(fmt: str, labels: dict[str, str]) -> str:
    """Grafana's ``{{label}}`` legend templates; an empty format shows the label set."""
    if not fmt:
        return ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) or "value"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt)


def scaled(unit: str, largest: float = 0.0) -> tuple[float, str]:
    """Factor and axis label for a Grafana unit; durations in ms unless ``largest`` reaches a second."""
    if unit == "s":
        return (1.0, "s") if largest >= 1 else (1e3, "ms")
    return {"reqps": (1.0, "per second"), "bytes": (1e-6, "MB")}.get(unit, (1.0, ""))


def stat_text(value: float, unit: str) -> str:
    """A stat panel's number, roughly as Grafana prints it."""
    if unit == "s":
        return f"{value * 1e3:.3g} ms" if abs(value) < 1 else f"{value:,.1f} s"
    factor, suffix = scaled(unit)
    value *= factor
    number = f"{value:,.0f}" if abs(value) >= 1000 or value == int(value) else f"{value:.4g}"
    return f"{number} {suffix}".strip()


def draw_timeseries(ax: Any, panel: dict[str, Any], series: list[tuple[str, list[float], list[float]]]) -> None:
    largest = max((abs(v) for _, _, values in series for v in values if math.isfinite(v)), default=0.0)
    factor, axis_label = scaled(panel["fieldConfig"]["defaults"].get("unit", ""), largest)
    for name, times, values in series:
        ax.plot(times, [v * factor for v in values], linewidth=1.2, label=name)
    ax.set_ylabel(axis_label, fontsize=7)
    ax.set_xlabel("seconds since the first scrape", fontsize=7)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=6, loc="best", ncols=min(len(series), 3))
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")


def reduce(values: list[float], calc: str) -> float | None:
    """Grafana's stat reducers over the finite values (NaN and gaps are Grafana's nulls)."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return None
    return {"lastNotNull": finite[-1], "mean": sum(finite) / len(finite), "max": max(finite)}[calc]


def draw_stat(ax: Any, panel: dict[str, Any], series: list[tuple[str, list[float], list[float]]]) -> None:
    unit = panel["fieldConfig"]["defaults"].get("unit", "")
    (calc,) = panel["options"]["reduceOptions"]["calcs"]
    ax.set_axis_off()
    reduced = [(name, reduce(values, calc)) for name, _, values in series]
    finite = [(name, v) for name, v in reduced if v is not None]
    if not finite:
        ax.text(0.5, 0.45, "no data", ha="center", va="center", fontsize=14, color="grey", transform=ax.transAxes)
        return
    text = "   ".join(f"{name}: {stat_text(v, unit)}" if len(finite) > 1 else stat_text(v, unit) for name, v in finite)
    ax.text(0.5, 0.45, text, ha="center", va="center", fontsize=16, transform=ax.transAxes)


def panel_series(
    url: str, panel: dict[str, Any], start: float, end: float, step: float
) -> list[tuple[str, list[float], list[float]]]:
    out = []
    for target in panel.get("targets", []):
        data = api(url, "query_range", query=promql(target["expr"], step), start=start, end=end, step=step)
        for result in data["result"]:
            times = [float(t) - start for t, _ in result["values"]]
            values = [float(v) for _, v in result["values"]]
            out.append((legend(target.get("legendFormat", ""), result["metric"]), times, values))
    return out


def panel_box(pos: dict[str, int], width: float, height: float) -> tuple[float, float, float, float]:
    """Axes rectangle (figure fractions) for a Grafana gridPos, leaving room for titles and tick labels."""
    left = pos["x"] / 24 * width + PAD_INCHES[0]
    right = (pos["x"] + pos["w"]) / 24 * width - PAD_INCHES[1]
    top = height - TITLE_INCHES - pos["y"] * ROW_INCHES - PAD_INCHES[2]
    bottom = height - TITLE_INCHES - (pos["y"] + pos["h"]) * ROW_INCHES + PAD_INCHES[3]
    return left / width, bottom / height, (right - left) / width, (top - bottom) / height


def render(dashboard: dict[str, Any], url: str, start: float, end: float, out: Path) -> Path:
    """Draw ``dashboard``'s panels on its 24-column grid from Prometheus at ``url`` over [start, end]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    step = max(1.0, math.ceil((end - start) / 240))
    panels = [p for p in dashboard["panels"] if p.get("targets")]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    width, height = 18.0, rows * ROW_INCHES + TITLE_INCHES
    fig = plt.figure(figsize=(width, height))
    for panel in panels:
        ax = fig.add_axes(panel_box(panel["gridPos"], width, height), frame_on=panel["type"] != "stat")
        ax.set_title(panel["title"], fontsize=9, loc="left")
        series = panel_series(url, panel, start, end, step)
        (draw_stat if panel["type"] == "stat" else draw_timeseries)(ax, panel, series)
    when = datetime.fromtimestamp(start, UTC).strftime("%Y-%m-%d %H:%M UTC")
    fig.suptitle(
        f"{dashboard['title']}  (Prometheus range queries over a real `fpocmh run`, {when}, {end - start:.0f} s)",
        fontsize=12,
        x=0.01,
        ha="left",
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def scraped_window(url: str, start: float, end: float) -> tuple[float, float]:
    """First and last moment in [start, end] when some target answered a scrape."""
    data = api(url, "query_range", query="max(up)", start=start, end=end, step=1.0)
    times = [float(t) for result in data["result"] for t, v in result["values"] if v == "1"]
    if not times:
        raise PrometheusError(f"no target was up between {start:.0f} and {end:.0f}")
    return min(times), max(times)


def render_all(url: str, start: float, end: float, out_dir: Path = OUT_DIR) -> list[Path]:
    """One picture per dashboard, over the part of [start, end] when the roles were being scraped."""
    first, last = scraped_window(url, start, end)
    return [render(d, url, first, last, out_dir / f"dashboard_{name}.png") for name, d in load_dashboards().items()]


def run_argv(run_args: Sequence[str], ports: dict[str, int]) -> list[str]:
    """``fpocmh run`` with each role's /metrics on its port in ``ports`` (config section -> port)."""
    argv = [sys.executable, "-m", "fpocmh", "run", *run_args]
    for section, port in ports.items():
        argv += ["--set", f"{section}.metrics_port={port}"]
    return argv


def record_run(run_args: Sequence[str], out_dir: Path) -> list[Path]:
    """Run ``fpocmh run`` under a fresh Prometheus and render every dashboard over the run."""
    ports = {section: free_port() for section in ROLE_SECTIONS}
    with Prometheus([f"127.0.0.1:{port}" for port in ports.values()]) as prom:
        start = time.time()
        subprocess.run(run_argv(run_args, ports), check=True, cwd=ROOT)
        # The roles have exited; Prometheus keeps what it scraped.
        end = time.time()
        return render_all(prom.url, start, end, out_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="folder for dashboard_<name>.png")
    parser.add_argument("--prometheus", help="render from this Prometheus instead of recording a new run")
    parser.add_argument("--start", type=float, help="with --prometheus: unix time of the first sample")
    parser.add_argument("--end", type=float, help="with --prometheus: unix time of the last sample")
    parser.add_argument("run_args", nargs="*", help="arguments for fpocmh run (after --)")
    args = parser.parse_args(argv)
    if args.prometheus:
        paths = render_all(args.prometheus, args.start, args.end or time.time(), args.out)
    else:
        paths = record_run(args.run_args or RUN_ARGS, args.out)
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
