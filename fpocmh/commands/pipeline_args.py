"""Arguments every pipeline command shares: ``--config``, repeated ``--set`` and ``--bootstrap``."""

from __future__ import annotations

import argparse
import threading
from typing import TYPE_CHECKING

from consumers.brokers.launch import BROKER_KINDS, local_broker

if TYPE_CHECKING:
    from consumers.metrics import Metrics
    from consumers.settings import PipelineConfig


def add_pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="PATH", help="deployment YAML on top of config/pipeline.yaml")
    parser.add_argument(
        "--set",
        dest="sets",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="override a config key (encoder.batch_size=512), or a Kafka client property "
        "(kafka.security.protocol=SASL_SSL); env: FPOCMH_PIPELINE__<KEY>, FPOCMH_KAFKA_<PROPERTY>",
    )
    parser.add_argument(
        "--bootstrap",
        metavar="HOST:PORT",
        help="Kafka bootstrap servers (default: kafka.bootstrap.servers, env FPOCMH_KAFKA_BOOTSTRAP_SERVERS)",
    )


BROKER_HELP = (
    "local broker started when no Kafka is configured: tansu (in memory, needs nothing but the wheel) "
    "or kafka (Apache Kafka, KRaft, from the jars `make install` fetched)"
)


BROKERS_HELP = (
    "nodes of the local Apache Kafka (default 1); more make a KRaft cluster whose topics are replicated "
    "as replication_factor and min_insync_replicas say (docs/cluster.md)"
)


def add_broker_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--broker", choices=BROKER_KINDS, help=f"{BROKER_HELP}; default {BROKER_KINDS[0]}")
    parser.add_argument("--brokers", type=int, default=1, metavar="N", help=BROKERS_HELP)


def add_secure_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--secure",
        action="store_true",
        help="secure the local broker (--broker kafka): SASL/SCRAM over TLS, a principal per role with the "
        "ACLs of security.acls (docs/security.md)",
    )


def broker_kind(args: argparse.Namespace, cfg: PipelineConfig) -> str:
    """``--broker``, or the default; refused next to a configured Kafka, where nothing is started, and
    checked (Java, jars) before the command prepares anything."""
    if args.broker is not None and cfg.bootstrap_servers:
        raise ValueError(
            f"--broker {args.broker} starts a local broker, but Kafka is configured ({cfg.bootstrap_servers}): "
            "drop --broker or the bootstrap servers"
        )
    if args.brokers != 1 and cfg.bootstrap_servers:
        raise ValueError(f"--brokers {args.brokers} starts a local cluster, but Kafka is configured: drop one")
    kind = args.broker or BROKER_KINDS[0]
    if getattr(args, "secure", False) and (cfg.bootstrap_servers or kind != "kafka"):
        raise ValueError(
            "--secure secures the local Apache Kafka it starts: use it with --broker kafka and no bootstrap "
            "servers (against your own cluster, set security.broker_login and the kafka: TLS properties)"
        )
    if not cfg.bootstrap_servers:
        # Built, not started: a missing Java or jar is reported now, not after minutes of preparation.
        local_broker(kind, args.brokers, cfg.replication(args.brokers))
    return kind


def load_config(args: argparse.Namespace, *extra_sets: str) -> PipelineConfig:
    from consumers import credentials, settings

    cfg = settings.load(args.config, [*args.sets, *extra_sets], args.bootstrap)
    return credentials.for_command(cfg, getattr(args, "command", ""))


def require_broker(cfg: PipelineConfig, command: str) -> None:
    """A role alone can't use a private embedded broker: nobody else could reach it."""
    if not cfg.bootstrap_servers:
        raise ValueError(
            f"{command} needs a broker: pass --bootstrap HOST:PORT or set kafka.bootstrap.servers "
            "(start a local one with `fpocmh broker`, or run everything with `fpocmh run`)"
        )


def role_setup(cfg: PipelineConfig, port: int) -> tuple[Metrics, threading.Event]:
    """Metrics (served on ``port`` unless 0), the pipeline's topics, and a stop flag set by SIGTERM/Ctrl-C;
    the heap built by start-up frozen (:func:`consumers.lifecycle.freeze_startup_heap`)."""
    from consumers.kafka import ensure_topics
    from consumers.lifecycle import freeze_startup_heap, install_signal_handlers
    from consumers.metrics import Metrics

    metrics = Metrics()
    metrics.serve(port)
    ensure_topics(cfg)
    stop = threading.Event()
    install_signal_handlers(stop)
    freeze_startup_heap()
    return metrics, stop
