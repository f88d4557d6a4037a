"""Kafka clients for every role, built from one config, and the pipeline's topics.

Client properties are layered: fixed defaults, then the role's named settings, then every property of
the ``kafka:`` mapping unchanged (so ``security.protocol``, ``sasl.*`` and ``ssl.*`` reach every
client), then the role's login (:mod:`consumers.credentials`) and the few the roles own (group id,
manual commits).
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic, OffsetSpec

from consumers import credentials, health
from consumers.brokers.launch import BROKER_KINDS, local_broker
from consumers.settings import PipelineConfig

log = logging.getLogger(__name__)

TOPIC_NAMES = ("arrivals", "codes", "models", "queries", "results", "dead_letters", "encoder_state")
# The code store, the model store and the encoders' intents are tables: the newest record per key is all
# a reader needs.
COMPACTED = ("codes", "models", "encoder_state")


def _base(cfg: PipelineConfig) -> dict[str, Any]:
    if not cfg.bootstrap_servers:
        raise ValueError("no bootstrap.servers configured (and no embedded broker started)")
    return {"bootstrap.servers": cfg.bootstrap_servers}


def _reporting(cfg: PipelineConfig, role: str) -> dict[str, Any]:
    """Every client of ``role`` reports broker loss to the role's health and logs through Python logging."""
    watcher = health.for_role(role, cfg.bootstrap_servers, cfg.broker.loss_timeout_s)
    return {"error_cb": watcher.on_error, "logger": health.client_logger(role)}


def producer_config(cfg: PipelineConfig, role: str, **props: Any) -> dict[str, Any]:
    conf = {
        **_base(cfg),
        "client.id": f"fpocmh-{role}",
        "linger.ms": cfg.linger_ms,
        "message.max.bytes": cfg.message_max_bytes,
        # Roles look at failures only; per-message success callbacks cost a Python call each.
        "delivery.report.only.error": True,
        # A write counts once min_insync_replicas replicas hold it (librdkafka's default, said because the
        # cluster's guarantees rest on it: a leader lost right after acknowledging loses nothing).
        "acks": "all",
        # Never give up on a message while the broker is away: the batch stays uncommitted meanwhile, and
        # broker.loss_timeout_s, not the client, decides when a role stops waiting.
        "message.timeout.ms": 0,
        **_reporting(cfg, role),
        **props,
    }
    conf.update(cfg.kafka)
    conf.update(credentials.login(cfg, role))
    return conf


def consumer_config(
    cfg: PipelineConfig, role: str, group: str | None, fetch_wait_max_ms: int, **props: Any
) -> dict[str, Any]:
    conf = {
        **_base(cfg),
        "client.id": f"fpocmh-{role}",
        "auto.offset.reset": "earliest",
        "session.timeout.ms": cfg.session_timeout_ms,
        "heartbeat.interval.ms": cfg.heartbeat_interval_ms,
        "max.poll.interval.ms": cfg.max_poll_interval_ms,
        "fetch.wait.max.ms": fetch_wait_max_ms,
        # Model updates arrive in parts of up to message_max_bytes; fetch at least one whole part.
        "fetch.max.bytes": max(52428800, 2 * cfg.message_max_bytes),
        "max.partition.fetch.bytes": max(1048576, 2 * cfg.message_max_bytes),
        # Once the prefetch queue is full librdkafka waits this long before it fetches again (default 1 s),
        # so a reader faster than the broker sits idle after every drained queue: 10 ms tripled the query
        # store's catch-up (140,000 -> 400,000 codes/s on tansu).
        "fetch.queue.backoff.ms": 10,
        **_reporting(cfg, role),
        **props,
    }
    conf.update(cfg.kafka)
    conf.update(credentials.login(cfg, role))
    # Readers of a whole topic (assign, no commits) still need a group id in librdkafka.
    conf["group.id"] = group or f"fpocmh-{role}-reader-{uuid.uuid4().hex[:12]}"
    conf["enable.auto.commit"] = False
    return conf


def admin_config(cfg: PipelineConfig) -> dict[str, Any]:
    return {**_base(cfg), "logger": health.client_logger("admin"), **cfg.kafka, **credentials.login(cfg)}


def make_admin(cfg: PipelineConfig, role: str) -> AdminClient:
    """An admin client of ``role``: its principal, reporting to its health."""
    return AdminClient({**_base(cfg), **_reporting(cfg, role), **cfg.kafka, **credentials.login(cfg, role)})


def require_broker_reachable(cfg: PipelineConfig) -> None:
    """One line naming the address, within ``broker.connect_timeout_s``, when no broker answers (or what to
    set when it refuses the login)."""
    login = credentials.login(cfg)
    fix = credentials.where(cfg, credentials.role_of(cfg)) if login else ""
    health.require_reachable({**_base(cfg), **cfg.kafka, **login}, cfg.broker.connect_timeout_s, fix)


def make_producer(cfg: PipelineConfig, role: str, **props: Any) -> Producer:
    return Producer(producer_config(cfg, role, **props))


def make_consumer(cfg: PipelineConfig, role: str, group: str | None, fetch_wait_max_ms: int, **props: Any) -> Consumer:
    return Consumer(consumer_config(cfg, role, group, fetch_wait_max_ms, **props))


# The fetch wait of quiet topics' readers on brokers that answer a waiting fetch at once (follow_wait_ms).
LONG_POLL_MS = 500


def is_tansu(cfg: PipelineConfig) -> bool:
    """The embedded tansu broker names itself in its cluster id. It accepts every transactional call but
    shows aborted records to read_committed readers, and its ListOffsets "latest" is early (``broker.md``)."""
    admin = AdminClient(admin_config(cfg))  # kept referenced until the answer: a dropped client cancels it
    cluster = admin.describe_cluster(request_timeout=cfg.broker.connect_timeout_s)
    return "tansu" in (cluster.result(cfg.broker.connect_timeout_s).cluster_id or "")


def transactions_supported(cfg: PipelineConfig) -> bool:
    return not is_tansu(cfg)


def exactly_once(cfg: PipelineConfig) -> bool:
    """``delivery`` resolved: ``auto`` is exactly-once where the broker has transactions."""
    if cfg.delivery == "auto":
        return transactions_supported(cfg)
    return cfg.delivery == "exactly_once"


def reader_isolation(cfg: PipelineConfig) -> str:
    """``query.isolation_level`` resolved: ``auto`` reads committed records only where the encoder writes in
    transactions, so a shard never serves a code from a batch that was aborted and re-coded."""
    level = cfg.query.isolation_level
    if level == "auto":
        return "read_committed" if exactly_once(cfg) else "read_uncommitted"
    return level


def watermarks_are_exact(cfg: PipelineConfig) -> bool:
    return not is_tansu(cfg)


def follow_wait_ms(cfg: PipelineConfig, short_ms: int) -> int:
    """fetch.wait.max.ms of a reader that follows a topic which is mostly quiet (requests, answers,
    codes, models).

    tansu holds an empty fetch for its whole wait even when a record arrives meanwhile (measured: 1.1 ms
    median delivery at 2 ms, 39 ms at 100 ms), so there the short wait is the latency. Apache Kafka
    answers a waiting fetch as soon as a record arrives, so a longer wait adds no latency, while a short
    one costs the broker a request every few milliseconds per idle reader: six idle readers took ~60% of
    a core at 2 ms and ~10% at 100 ms, cores the shards' scans need; two idle shards (query readers at
    100 ms, model followers at 50 ms) ~8%, and ~1% once both waited 500 ms."""
    return short_ms if is_tansu(cfg) else max(short_ms, LONG_POLL_MS)


def query_fetch_wait_ms(cfg: PipelineConfig) -> int:
    """fetch.wait.max.ms of the query tier's readers (requests, answers, codes)."""
    return follow_wait_ms(cfg, cfg.query.fetch_wait_max_ms)


def topic_id(cfg: PipelineConfig, topic: str) -> str | None:
    """The topic's id (KIP-516): a recreated topic gets a new one. None when the topic does not exist."""
    from confluent_kafka import TopicCollection

    admin = AdminClient(admin_config(cfg))
    future = admin.describe_topics(TopicCollection([topic]), request_timeout=cfg.broker.connect_timeout_s)[topic]
    try:
        return str(future.result(cfg.broker.connect_timeout_s).topic_id)
    except KafkaException:
        return None


def topic_properties(cfg: PipelineConfig, name: str) -> dict[str, str]:
    props = {"cleanup.policy": "compact"} if name in COMPACTED else {}
    props.update({k: str(v) for k, v in getattr(cfg.topic_config, name).items()})
    return props


def ensure_topics(cfg: PipelineConfig, timeout: float = 30.0) -> list[str]:
    """Create the pipeline's topics that don't exist yet; returns the names created."""
    require_broker_reachable(cfg)
    admin = AdminClient(admin_config(cfg))
    meta = admin.list_topics(timeout=timeout)
    existing = set(meta.topics)
    factor, in_sync = cfg.replication(len(meta.brokers))
    new = [
        NewTopic(
            getattr(cfg.topics, name),
            num_partitions=getattr(cfg.partitions, name),
            replication_factor=factor,
            config={"min.insync.replicas": str(in_sync), **topic_properties(cfg, name)},
        )
        for name in TOPIC_NAMES
        if getattr(cfg.topics, name) not in existing
    ]
    created = []
    for topic, future in admin.create_topics(new, request_timeout=timeout).items() if new else ():
        try:
            future.result(timeout)
            created.append(topic)
        except KafkaException as exc:
            if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":  # another role raced us to it
                raise
    if created:
        wait_for_topics(admin, {t.topic: t.num_partitions for t in new}, timeout)
        log.info("created topics %s", ", ".join(created))
    return created


def _served(topic: Any, partitions: int) -> bool:
    """The topic's metadata lists all its partitions, each with a leader."""
    if topic is None or topic.error is not None or len(topic.partitions) < partitions:
        return False
    return all(p.error is None and p.leader >= 0 for p in topic.partitions.values())


def _leaders_answer(admin: AdminClient, partitions: dict[str, int], timeout: float) -> bool:
    """Every partition's leader answers an offsets request (metadata names a leader a moment before it leads)."""
    specs = {TopicPartition(name, p): OffsetSpec.latest() for name, count in partitions.items() for p in range(count)}
    try:
        for future in admin.list_offsets(specs, request_timeout=timeout).values():
            future.result(timeout)
    except KafkaException:
        return False
    return True


def wait_for_topics(admin: AdminClient, partitions: dict[str, int], timeout: float) -> None:
    """Until the broker's metadata shows every topic with its partitions and their leaders: on Apache
    Kafka, CreateTopics returns when the controller has the topics, a moment before the broker serves them."""
    deadline = time.monotonic() + timeout
    while True:
        meta = admin.list_topics(timeout=timeout).topics
        pending = [name for name, count in partitions.items() if not _served(meta.get(name), count)]
        if not pending and _leaders_answer(admin, partitions, timeout):
            return
        if time.monotonic() > deadline:
            raise KafkaException(f"topics {pending} not in the broker's metadata {timeout:.0f} s after creation")
        time.sleep(0.05)


def partitions_of(client: Consumer | AdminClient, topic: str, timeout: float = 10.0) -> list[int]:
    meta = client.list_topics(topic, timeout=timeout).topics.get(topic)
    if meta is None or meta.error is not None or not meta.partitions:
        raise KafkaException(meta.error if meta is not None else f"topic {topic} not found")
    return sorted(meta.partitions)


def assign_all(consumer: Consumer, topic: str, offset: int) -> list[TopicPartition]:
    parts = [TopicPartition(topic, p, offset) for p in partitions_of(consumer, topic)]
    consumer.assign(parts)
    return parts


@contextlib.contextmanager
def connect(
    cfg: PipelineConfig,
    log_dir: Path | None = None,
    kind: str = BROKER_KINDS[0],
    brokers: int = 1,
    secure: bool = False,
) -> Iterator[PipelineConfig]:
    """``cfg`` as it is when Kafka is configured; otherwise with a local broker of ``kind`` (``brokers`` of
    them, replicated as the config says) for the block (``secure``: one secured node, with a principal per
    role and the ACLs of ``security.acls``)."""
    if cfg.bootstrap_servers:
        yield cfg
        return
    log_path = None if log_dir is None else log_dir / f"{kind}.log"
    if secure:
        if brokers != 1:
            raise ValueError("--secure starts one secured node; run a secured cluster of your own for more")
        with credentials.secured_broker(cfg, kind, log_dir, log_path=log_path) as secured:
            yield secured
        return
    with local_broker(kind, brokers, cfg.replication(brokers), log_path=log_path) as bootstrap:
        log.info("no Kafka configured: started a local %s broker on %s", kind, bootstrap)
        yield cfg.with_bootstrap(bootstrap)
