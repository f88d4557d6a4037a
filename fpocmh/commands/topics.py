"""``fpocmh topics``: create the pipeline's topics and show them."""

from __future__ import annotations

import argparse

from fpocmh.commands.pipeline_args import add_pipeline_arguments, load_config, require_broker

HELP = "create the pipeline's topics (codes and models compacted) and list them with partition counts"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_pipeline_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from confluent_kafka.admin import AdminClient

    from consumers.kafka import TOPIC_NAMES, admin_config, ensure_topics, topic_properties

    cfg = load_config(args)
    require_broker(cfg, "fpocmh topics")
    created = set(ensure_topics(cfg))
    meta = AdminClient(admin_config(cfg)).list_topics(timeout=10).topics
    for name in TOPIC_NAMES:
        topic = getattr(cfg.topics, name)
        props = ", ".join(f"{k}={v}" for k, v in topic_properties(cfg, name).items())
        state = "created" if topic in created else "exists"
        print(f"{name:<13} {topic:<28} {len(meta[topic].partitions):>3} partitions  {state:<7}  {props}")
    return 0
