"""``fpocmh broker``: a local broker in the foreground, for running roles by hand."""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from consumers.brokers.launch import BROKER_KINDS
from fpocmh.commands.pipeline_args import BROKER_HELP, BROKERS_HELP, add_pipeline_arguments, add_secure_argument

if TYPE_CHECKING:
    from consumers.brokers.process import BrokerProcess
    from consumers.settings import PipelineConfig

HELP = "run a local broker (tansu in memory, or Apache Kafka) until Ctrl-C"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kind", choices=BROKER_KINDS, default=BROKER_KINDS[0], help=BROKER_HELP)
    parser.add_argument("--host", default="127.0.0.1", help="listen address")
    parser.add_argument("--port", type=int, default=0, help="port (0: a free one; of the first node of a cluster)")
    parser.add_argument("--brokers", type=int, default=1, metavar="N", help=BROKERS_HELP)
    add_secure_argument(parser)
    parser.add_argument(
        "--secrets-dir",
        type=Path,
        default=Path("runs/broker-secure"),
        help="with --secure: where the CA, the principals' password files and client.yaml go",
    )
    # The replication of a cluster and, with --secure, the topics, groups, principals and ACL table come
    # from the pipeline config.
    add_pipeline_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from consumers.brokers.launch import local_broker
    from consumers.lifecycle import install_signal_handlers

    stop = threading.Event()
    install_signal_handlers(stop)
    if args.secure:
        if args.brokers != 1:
            raise ValueError("--secure starts one secured node; run a secured cluster of your own for more")
        return _secured(args, stop)
    # A cluster's internal topics are replicated as the pipeline's own will be.
    from fpocmh.commands.pipeline_args import load_config

    replication = load_config(args).replication(args.brokers)
    broker = local_broker(args.kind, args.brokers, replication, host=args.host, port=args.port or None)
    with broker as bootstrap:
        print(f"broker ready: --bootstrap {bootstrap}   (or FPOCMH_KAFKA_BOOTSTRAP_SERVERS={bootstrap})", flush=True)
        return _until_stopped(args, broker, stop)


def _until_stopped(args: argparse.Namespace, broker: BrokerProcess, stop: threading.Event) -> int:
    # Poll the process too: a broker that died must not leave a command that looks alive.
    while not stop.wait(0.5):
        code = broker.exit_code()
        if code is not None:
            print(
                f"fpocmh broker: error: the {args.kind} broker exited with code {code} (log {broker.log_path})",
                file=sys.stderr,
            )
            return 1
    return 0


def _secured(args: argparse.Namespace, stop: threading.Event) -> int:
    """A secured Apache Kafka; clients get a config fragment (address, TLS, where the passwords are)."""
    from consumers import credentials
    from consumers.brokers.launch import local_broker
    from consumers.brokers.security import BrokerSecurity
    from fpocmh.commands.pipeline_args import load_config

    if args.kind != "kafka":
        raise ValueError(f"--secure needs --kind kafka: {args.kind} has no authentication or ACLs")
    cfg = load_config(args)
    folder = args.secrets_dir.resolve()
    security = BrokerSecurity(folder / "credentials", cfg.security.principals)
    broker = local_broker(args.kind, host=args.host, port=args.port or None, security=security)
    with broker as bootstrap:
        secured = credentials.secured(cfg, bootstrap, security.client_properties(), security.credentials_dir)
        acls = security.apply_acls(credentials.acl_bindings(secured))
        client = folder / "client.yaml"
        _write_client_config(client, secured)
        print(
            f"secured broker ready on {bootstrap}: {len(cfg.security.principals)} principals, {acls} ACLs; "
            f"passwords in {security.credentials_dir}\n  roles and clients: --config {client}",
            flush=True,
        )
        return _until_stopped(args, broker, stop)


def _write_client_config(path: Path, cfg: PipelineConfig) -> None:
    """The part of the pipeline config a client of the secured broker needs: no password in it."""
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    fragment = {
        "kafka": dict(cfg.kafka),
        "security": {"broker_login": True, "credentials_dir": cfg.security.credentials_dir},
    }
    path.write_text(yaml.safe_dump(fragment, sort_keys=False))
