"""``fpocmh topics``: create the pipeline's topics and show them."""

from __future__ import annotations

import argparse

from fpocmh.commands.pipeline_args import add_pipeline_arguments, load_config, require_broker

HELP = "create the pipeline's topics (codes and models compacted) and list them with partition counts"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_pipeline_arguments(parser)
    parser.add_argument(
        "--provision",
        action="store_true",
        help="first create a SCRAM user per principal (passwords from the credentials folder) and the ACL "
        "table, logged in as the admin principal (the secured compose deployment's topics-init)",
    )


def run(args: argparse.Namespace) -> int:
    from confluent_kafka.admin import AdminClient

    from consumers.kafka import TOPIC_NAMES, admin_config, ensure_topics, topic_properties

    cfg = load_config(args)
    require_broker(cfg, "fpocmh topics")
    if args.provision:
        from consumers import credentials

        if not cfg.security.broker_login:
            raise ValueError("fpocmh topics --provision needs security.broker_login: true (a secured broker)")
        users = credentials.provision_users(cfg)
        print(f"{users} SCRAM users, {credentials.apply_acls(cfg)} ACL bindings")
    created = set(ensure_topics(cfg))
    meta = AdminClient(admin_config(cfg)).list_topics(timeout=10).topics
    for name in TOPIC_NAMES:
        topic = getattr(cfg.topics, name)
        props = ", ".join(f"{k}={v}" for k, v in topic_properties(cfg, name).items())
        state = "created" if topic in created else "exists"
        print(f"{name:<13} {topic:<28} {len(meta[topic].partitions):>3} partitions  {state:<7}  {props}")
    return 0
