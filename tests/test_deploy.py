"""The deployment files agree with the code: compose, Dockerfile, Prometheus and Grafana (no Docker needed)."""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
import shlex
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from consumers.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DEPLOY = ROOT / "deploy"

_spec = importlib.util.spec_from_file_location("render_dashboards", ROOT / "scripts" / "render_dashboards.py")
render_dashboards = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(render_dashboards)

metric_names = render_dashboards.metric_names
unknown_metrics = render_dashboards.unknown_metrics


def exported_series(registry: CollectorRegistry) -> set[str]:
    """Every series name the registry's metric families can expose, sampled or not yet."""
    return render_dashboards.series_names((fam.name, fam.type) for fam in registry.collect())


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def dashboards() -> dict[str, dict]:
    return render_dashboards.load_dashboards()


@pytest.fixture(scope="module")
def role_series() -> set[str]:
    # Every role builds exactly this object, so its families are what a running role can export.
    return exported_series(Metrics(CollectorRegistry()).registry)


# --- PromQL name extraction -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        (
            "sum by (role, topic) (rate(fpocmh_messages_consumed_total[$__rate_interval]))",
            {"fpocmh_messages_consumed_total"},
        ),
        (
            'histogram_quantile(0.95, sum by (le) (rate(fpocmh_query_duration_seconds_bucket{role="query"}[5m])))',
            {"fpocmh_query_duration_seconds_bucket"},
        ),
        (
            'time() - max(fpocmh_model_published_timestamp_seconds{role=~"a|b"}) offset 1m',
            {"fpocmh_model_published_timestamp_seconds"},
        ),
        ("sum(x_total) / sum(y_count) * 1e3 or vector(0)", {"x_total", "y_count"}),
        ('label_replace(up, "dst", "$1", "src", "(.*)") > bool 0.5', {"up"}),
        ("sum(rate(a_total[1m])) by (job) + on (job) group_left (role) b", {"a_total", "b"}),
    ],
)
def test_metric_names_finds_exactly_the_selected_metrics(expr, names):
    assert metric_names(expr) == names


def test_exported_series_follow_each_metric_type():
    series = exported_series(Metrics(CollectorRegistry()).registry)
    assert {"fpocmh_messages_consumed_total", "fpocmh_consumer_lag", "fpocmh_query_duration_seconds_bucket"} <= series
    # A histogram's own name and a counter's name without _total are not series.
    assert "fpocmh_query_duration_seconds" not in series
    assert "fpocmh_messages_consumed" not in series


# --- Grafana ------------------------------------------------------------------------------------


def test_there_is_an_overview_a_learner_and_a_retrieval_dashboard(dashboards):
    assert set(dashboards) == {"overview", "learner", "retrieval"}


def test_every_panel_queries_only_metrics_the_roles_export(dashboards, role_series):
    for name, dashboard in dashboards.items():
        assert unknown_metrics(dashboard, role_series) == [], f"{name}.json"


def test_a_typo_in_a_panel_metric_fails_the_check(dashboards, role_series):
    broken = json.loads(json.dumps(dashboards["overview"]))
    _, target = next(render_dashboards.panel_targets(broken))
    target["expr"] = "sum(rate(fpocmh_mesages_consumed_total[5m]))"
    assert unknown_metrics(broken, role_series) == [f"{broken['panels'][0]['title']}: fpocmh_mesages_consumed_total"]


def test_every_issue_metric_has_a_panel(dashboards, role_series):
    used = {
        name
        for dashboard in dashboards.values()
        for _, target in render_dashboards.panel_targets(dashboard)
        for name in metric_names(target["expr"])
    }
    families = {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in used}
    wanted = {fam.name for fam in Metrics(CollectorRegistry()).registry.collect()}
    assert wanted - families == set()


def test_role_label_matchers_name_real_roles(dashboards):
    from consumers.metrics import ROLES

    for dashboard in dashboards.values():
        for panel, target in render_dashboards.panel_targets(dashboard):
            for value in re.findall(r'role=~?"([^"]*)"', target["expr"]):
                assert set(value.split("|")) <= set(ROLES), f"{panel['title']}: role {value!r}"


def test_dashboards_are_provisionable_files_not_exports_for_sharing(dashboards):
    for name, dashboard in dashboards.items():
        text = json.dumps(dashboard)
        assert "__inputs" not in dashboard and "${DS_" not in text, name
        assert dashboard["uid"] and dashboard["title"], name
        for panel, target in render_dashboards.panel_targets(dashboard):
            for source in (panel["datasource"], target["datasource"]):
                assert source == {"type": "prometheus", "uid": "prometheus"}, f"{name}: {panel['title']}"


def test_dashboard_uids_are_unique_and_panels_do_not_overlap(dashboards):
    assert len({d["uid"] for d in dashboards.values()}) == len(dashboards)
    for name, dashboard in dashboards.items():
        taken: set[tuple[int, int]] = set()
        for panel in dashboard["panels"]:
            pos = panel["gridPos"]
            assert pos["x"] + pos["w"] <= 24, f"{name}: {panel['title']}"
            cells = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
            assert not cells & taken, f"{name}: {panel['title']} overlaps another panel"
            taken |= cells


def test_datasource_has_the_fixed_uid_and_points_at_the_prometheus_service(compose):
    source = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (ds,) = source["datasources"]
    assert ds["uid"] == "prometheus" and ds["type"] == "prometheus"
    assert ds["url"] == f"http://prometheus:{container_port(compose['services']['prometheus'])}"


def test_dashboard_provider_path_is_where_compose_mounts_the_dashboards(compose):
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/provider.yml").read_text())
    (entry,) = provider["providers"]
    mounts = dict(bind_mounts(compose["services"]["grafana"]))
    assert mounts[entry["options"]["path"]] == ROOT / "deploy/grafana/dashboards"
    assert mounts["/etc/grafana/provisioning"] == ROOT / "deploy/grafana/provisioning"


# --- docker-compose.yml -------------------------------------------------------------------------


def bind_mounts(service: dict) -> list[tuple[str, Path]]:
    """(container path, host path) of every bind mount, with ${VAR:-default} resolved to its default."""
    out = []
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":") if isinstance(volume, str) else (volume["source"], volume["target"])
        source = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", source)
        if source.startswith((".", "/")):
            out.append((target, (ROOT / source).resolve()))
    return out


def container_port(service: dict) -> int:
    (port,) = {int(str(p).rsplit(":", 1)[-1].split("/")[0]) for p in service.get("ports", [])}
    return port


def test_compose_pins_every_image(compose):
    for name, service in compose["services"].items():
        if "image" in service and "build" not in service:
            repo, _, tag = service["image"].rpartition(":")
            assert repo and tag and tag != "latest", f"{name}: pin the image tag ({service['image']})"


def test_every_build_context_has_the_dockerfile_and_its_copied_paths(compose):
    builds = {name: s["build"] for name, s in compose["services"].items() if "build" in s}
    assert builds, "no service is built from the project"
    for name, build in builds.items():
        context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
        dockerfile = context / (build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile")
        assert dockerfile.is_file(), name
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY "):
                for source in line.split()[1:-1]:
                    assert (context / source).exists(), f"{dockerfile.name}: COPY {source} does not exist"


def test_every_bind_mounted_config_exists_and_is_read_only(compose):
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            if isinstance(volume, str) and volume.startswith("./"):
                source = volume.split(":")[0]
                assert (ROOT / source).exists(), f"{name}: {source} does not exist"
                assert volume.endswith(":ro"), f"{name}: mount {source} read-only"


def test_the_dataset_is_mounted_not_baked_in(compose):
    dockerignore = (ROOT / ".dockerignore").read_text().split()
    assert "*.npz" in dockerignore and "data" in dockerignore
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "FPOCMH_DATA=/data" in dockerfile
    # The roles that read the dataset: the replayer streams it, the learner trains version 0 on its offline part.
    for name in ("replay", "learner"):
        volumes = compose["services"][name]["volumes"]
        assert any(v.startswith("${FPOCMH_DATA_DIR:-") and v.endswith(":/data:ro") for v in volumes), name


# --- compose against the CLI and config/pipeline.yaml ------------------------------------------

# Compose service -> the fpocmh command it runs.
ROLE_SERVICES = {
    "replay": "replay",
    "encoder": "encode",
    "learner": "learn",
    "query-s0": "serve-queries",
    "query-s1": "serve-queries",
}
# Compose service -> its section of config/pipeline.yaml, which is also its Prometheus job (the query
# shards share the network alias "query").
ROLE_SECTIONS = {
    "replay": "replay",
    "encoder": "encoder",
    "learner": "learner",
    "query-s0": "query",
    "query-s1": "query",
}
QUERY_SHARDS = ("query-s0", "query-s1")
SCALED_INPUTS = {"encoder": "arrivals", "query-s0": "queries", "query-s1": "queries"}
# Kafka's default message.max.bytes, used unless compose sets KAFKA_MESSAGE_MAX_BYTES.
KAFKA_DEFAULT_MESSAGE_MAX_BYTES = 1048588


def project_services(compose: dict) -> dict[str, dict]:
    return {name: s for name, s in compose["services"].items() if s.get("image") == "fpocmh:local"}


def service_argv(service: dict) -> list[str]:
    entrypoint = service.get("entrypoint", ["fpocmh"])
    assert entrypoint[0] == "fpocmh"
    return [*entrypoint[1:], *service.get("command", [])]


@pytest.fixture
def service_config(monkeypatch):
    """``load(service)``: config/pipeline.yaml as the service's container sees it, with its environment."""
    from consumers import settings

    def load(service: dict) -> settings.PipelineConfig:
        with monkeypatch.context() as env:
            for key in [k for k in os.environ if k.startswith("FPOCMH_")]:
                env.delenv(key)
            for key, value in service.get("environment", {}).items():
                env.setenv(key, str(value))
            return settings.load()

    return load


def test_every_project_service_runs_a_real_fpocmh_command(compose):
    from fpocmh.cli import build_parser

    services = project_services(compose)
    assert set(ROLE_SERVICES) | {"topics-init"} == set(services)
    parser = build_parser()
    for name, service in services.items():
        args = parser.parse_args(service_argv(service))
        assert args.command == ROLE_SERVICES.get(name, "topics"), name


def test_project_services_share_one_image_built_from_the_repo(compose):
    for name, service in project_services(compose).items():
        assert service["build"] == ".", name


def test_roles_reach_kafka_by_its_advertised_in_network_listener(compose, service_config):
    kafka = compose["services"]["kafka"]["environment"]
    advertised = dict(item.split("://")[::-1] for item in kafka["KAFKA_ADVERTISED_LISTENERS"].split(","))
    for name, service in project_services(compose).items():
        assert service_config(service).bootstrap_servers in advertised, name


def test_prometheus_scrapes_every_role_at_its_configured_port(compose, service_config):
    scrape = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())["scrape_configs"]
    jobs = {job["job_name"]: job for job in scrape}
    for name, section in ROLE_SECTIONS.items():
        service = compose["services"][name]
        port = getattr(service_config(service), section).metrics_port
        assert port > 0, f"{name}: metrics are off in the stack"
        assert service["environment"]["FPOCMH_METRICS_ADDR"] == "0.0.0.0", f"{name}: /metrics only on loopback"
        (sd,) = jobs[section]["dns_sd_configs"]
        aliases = service.get("networks", {}).get("default", {}).get("aliases", [])
        assert sd["port"] == port and (sd["names"] == [name] or sd["names"][0] in aliases), name
    (self_target,) = jobs["prometheus"]["static_configs"][0]["targets"]
    assert self_target == f"localhost:{container_port(compose['services']['prometheus'])}"
    assert set(jobs) == set(ROLE_SECTIONS.values()) | {"prometheus"}, "a job scrapes a service that does not exist"


def test_the_query_shards_split_the_codes_partitions_and_keep_their_own_snapshots(compose, service_config):
    from consumers.query.shards import ShardSpec
    from fpocmh.cli import build_parser

    parser = build_parser()
    specs = [ShardSpec.parse(parser.parse_args(service_argv(compose["services"][n])).shard) for n in QUERY_SHARDS]
    assert sorted(spec.index for spec in specs) == list(range(len(QUERY_SHARDS)))
    assert {spec.count for spec in specs} == {len(QUERY_SHARDS)}
    codes_partitions = service_config(compose["services"][QUERY_SHARDS[0]]).partitions.codes
    owned = [p for spec in specs for p in spec.owns(range(codes_partitions))]
    assert sorted(owned) == list(range(codes_partitions)), "every codes partition is owned by exactly one shard"
    volumes = [v for n in QUERY_SHARDS for v in compose["services"][n]["volumes"] if v.endswith(":/app/runs")]
    assert len(set(volumes)) == len(QUERY_SHARDS), "each shard writes its snapshots to a volume of its own"


def test_kafka_takes_the_largest_message_the_roles_produce(compose, service_config):
    kafka = compose["services"]["kafka"]["environment"]
    limit = int(kafka.get("KAFKA_MESSAGE_MAX_BYTES", KAFKA_DEFAULT_MESSAGE_MAX_BYTES))
    for name, service in project_services(compose).items():
        assert service_config(service).message_max_bytes <= limit, name


def test_start_up_order_is_broker_healthy_then_topics_then_roles(compose):
    services = compose["services"]
    health = " ".join(services["kafka"]["healthcheck"]["test"])
    assert "kafka-topics.sh --bootstrap-server localhost:9092 --list" in health
    assert services["topics-init"]["depends_on"] == {"kafka": {"condition": "service_healthy"}}
    for name in ("encoder", "learner", *QUERY_SHARDS):
        assert services[name]["depends_on"] == {"topics-init": {"condition": "service_completed_successfully"}}, name
    assert services["topics-init"]["restart"] == "no"
    assert services["kafka"]["environment"]["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"


def test_kafka_is_a_single_kraft_node_whose_storage_survives_restarts(compose):
    kafka = compose["services"]["kafka"]
    env = kafka["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{env['KAFKA_NODE_ID']}@kafka:9093"
    # kafka-storage format takes a base64url-encoded 16-byte UUID; a fixed one keeps the volume valid.
    assert len(base64.urlsafe_b64decode(env["CLUSTER_ID"] + "==")) == 16
    assert f"kafka-data:{env['KAFKA_LOG_DIRS']}" in kafka["volumes"]


def test_documented_scale_counts_fit_the_partition_counts(compose, service_config):
    partitions = service_config(compose["services"]["encoder"]).partitions
    docs = [COMPOSE, ROOT / "README.md"]
    assert re.search(r"--scale (\w+)=(\d+)", COMPOSE.read_text()), "docker-compose.yml: no --scale example"
    for path in docs:
        for name, count in re.findall(r"--scale ([\w-]+)=(\d+)", path.read_text()):
            assert int(count) <= getattr(partitions, SCALED_INPUTS[name]), f"{path.name}: --scale {name}={count}"


def test_documented_replay_lines_parse_as_fpocmh_replay_arguments(compose):
    from fpocmh.cli import build_parser

    entrypoint = compose["services"]["replay"]["entrypoint"]
    docs = [COMPOSE, ROOT / "README.md"]
    pattern = re.compile(r"docker compose run --rm replay([^#\n`\]]*)")
    lines = [line for path in docs for line in pattern.findall(path.read_text())]
    assert lines, "no documented `docker compose run --rm replay` line"
    for line in lines:
        args = build_parser().parse_args([*entrypoint[1:], *shlex.split(line)])
        assert args.command == "replay" and args.score, line


def test_the_docs_show_a_picture_of_every_dashboard(dashboards):
    docs = (ROOT / "README.md").read_text()
    for name in dashboards:
        picture = f"docs/img/dashboard_{name}.png"
        assert (ROOT / picture).is_file(), f"{picture} missing: run python scripts/render_dashboards.py"
        assert f"({picture})" in docs, f"{picture} is not shown in the README"
