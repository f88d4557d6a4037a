"""The pipeline's configuration: one frozen tree built from ``config/pipeline.yaml``.

Kafka client properties get their own override path, because their names contain dots and any
librdkafka property must be accepted: ``--set kafka.<property>=value``, ``FPOCMH_KAFKA_<PROPERTY>``
environment variables (dots written as underscores) and ``--bootstrap``.
"""

from __future__ import annotations

import dataclasses
import os
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from consumers.learner.pacing import PacingConfig
from fpocmh_core import config
from fpocmh_core.hamming import KINDS as INDEX_KINDS
from fpocmh_core.model_check import ModelCheckConfig

KAFKA_ENV_PREFIX = "FPOCMH_KAFKA_"
# Set by the roles themselves: their commit logic depends on them.
OWNED_PROPERTIES = ("group.id", "enable.auto.commit", "enable.auto.offset.store")
MODEL_KEY_ENV = "FPOCMH_MODEL_KEY"
MODEL_KEY_FILE_ENV = "FPOCMH_MODEL_KEY_FILE"
TOPIC_RESET_POLICIES = ("stop", "earliest")
DELIVERY_MODES = ("auto", "exactly_once", "at_least_once")
ISOLATION_LEVELS = ("auto", "read_committed", "read_uncommitted")


@dataclass(frozen=True)
class Topics:
    arrivals: str
    codes: str
    models: str
    queries: str
    results: str
    dead_letters: str
    encoder_state: str


@dataclass(frozen=True)
class Partitions:
    arrivals: int
    codes: int
    models: int
    queries: int
    results: int
    dead_letters: int
    encoder_state: int


@dataclass(frozen=True)
class TopicConfig:
    arrivals: Mapping[str, Any]
    codes: Mapping[str, Any]
    models: Mapping[str, Any]
    queries: Mapping[str, Any]
    results: Mapping[str, Any]
    dead_letters: Mapping[str, Any]
    encoder_state: Mapping[str, Any]


@dataclass(frozen=True)
class EncoderConfig:
    group: str
    transactional_id: str
    batch_size: int
    poll_timeout_s: float
    fetch_wait_max_ms: int
    threads: int
    metrics_port: int


@dataclass(frozen=True)
class LearnerConfig:
    group: str
    batch_size: int
    poll_timeout_s: float
    fetch_wait_max_ms: int
    publish_every_items: int
    publish_every_s: float
    checkpoint_dir: str
    keep_checkpoints: int
    init: str
    bootstrap_overrides: Mapping[str, Any]
    on_topic_reset: str
    flush_after_s: float
    max_held_codes: int
    pacing: PacingConfig
    threads: int
    metrics_port: int

    def __post_init__(self) -> None:
        if self.on_topic_reset not in TOPIC_RESET_POLICIES:
            raise config.ConfigError(
                f"pipeline: learner.on_topic_reset must be one of {TOPIC_RESET_POLICIES}, got {self.on_topic_reset!r}"
            )


@dataclass(frozen=True)
class QueryConfig:
    group: str
    batch_size: int
    poll_timeout_s: float
    fetch_wait_max_ms: int
    codes_batch_size: int
    max_request_age_s: float
    commit_every_s: float
    client_timeout_s: float
    threads: int
    metrics_port: int
    shards: int
    missing_shards: str
    max_wait_s: float
    isolation_level: str
    snapshot_dir: str
    snapshot_every_codes: int
    snapshot_every_s: float
    keep_snapshots: int
    index: str


@dataclass(frozen=True)
class ReplayConfig:
    rate: float
    linger_ms: int
    offline: bool
    bad_share: float
    score_batch: int
    score_topk: int
    metrics_port: int


@dataclass(frozen=True)
class RunConfig:
    work_dir: str
    catchup_timeout_s: float
    latency_probes: int


@dataclass(frozen=True)
class BrokerConfig:
    connect_timeout_s: float
    loss_timeout_s: float


@dataclass(frozen=True)
class ValidationConfig:
    max_item_id: int


@dataclass(frozen=True)
class SecurityConfig:
    model_key: str
    model_key_file: str
    broker_login: bool
    credentials_dir: str
    login: str
    principals: Mapping[str, str]
    acls: Mapping[str, Any]


@dataclass(frozen=True)
class FeaturesConfig:
    """The dataset arrays that are the image and the text modality (CrossModalDataset.with_features)."""

    image: str
    text: str


@dataclass(frozen=True)
class PipelineConfig:
    method: str
    bits: int
    delivery: str
    features: FeaturesConfig
    kafka: Mapping[str, Any]
    topics: Topics
    partitions: Partitions
    topic_config: TopicConfig
    replication_factor: int
    min_insync_replicas: int
    session_timeout_ms: int
    heartbeat_interval_ms: int
    max_poll_interval_ms: int
    linger_ms: int
    message_max_bytes: int
    flush_timeout_s: float
    broker: BrokerConfig
    validation: ValidationConfig
    model_check: ModelCheckConfig
    security: SecurityConfig
    encoder: EncoderConfig
    learner: LearnerConfig
    query: QueryConfig
    replay: ReplayConfig
    run: RunConfig

    def __post_init__(self) -> None:
        if self.delivery not in DELIVERY_MODES:
            raise config.ConfigError(f"pipeline: delivery must be one of {DELIVERY_MODES}, got {self.delivery!r}")
        if self.bits % 8 or self.bits <= 0:
            raise config.ConfigError(f"pipeline: bits must be a positive multiple of 8, got {self.bits}")
        if self.session_timeout_ms < 3 * self.heartbeat_interval_ms:
            raise config.ConfigError("pipeline: session_timeout_ms must be at least 3 x heartbeat_interval_ms")
        if self.max_poll_interval_ms < self.session_timeout_ms:
            raise config.ConfigError("pipeline: max_poll_interval_ms must be >= session_timeout_ms")
        if self.message_max_bytes < 65536:
            raise config.ConfigError(f"pipeline: message_max_bytes {self.message_max_bytes} is below 64 KiB")
        if self.replay.rate < 0:
            raise config.ConfigError(f"pipeline: replay.rate must be >= 0, got {self.replay.rate}")
        if not 0 <= self.replay.bad_share < 1:
            raise config.ConfigError(f"pipeline: replay.bad_share must be in [0, 1), got {self.replay.bad_share}")
        for name in ("encoder", "learner", "query"):
            if getattr(self, name).batch_size < 1:
                raise config.ConfigError(f"pipeline: {name}.batch_size must be >= 1")
        if self.query.commit_every_s < 0:
            raise config.ConfigError(f"pipeline: query.commit_every_s must be >= 0, got {self.query.commit_every_s}")
        if self.query.isolation_level not in ISOLATION_LEVELS:
            raise config.ConfigError(
                f"pipeline: query.isolation_level is one of {ISOLATION_LEVELS}, not {self.query.isolation_level!r}"
            )
        if self.query.index not in INDEX_KINDS:
            raise config.ConfigError(f"pipeline: query.index is one of {INDEX_KINDS}, not {self.query.index!r}")
        if self.query.shards < 1:
            raise config.ConfigError(f"pipeline: query.shards must be >= 1, got {self.query.shards}")
        if self.query.missing_shards not in ("error", "partial"):
            raise config.ConfigError(
                f"pipeline: query.missing_shards is error or partial, not {self.query.missing_shards!r}"
            )
        if self.replication_factor < 0 or self.min_insync_replicas < 0:
            raise config.ConfigError("pipeline: replication_factor and min_insync_replicas must be >= 0 (0: auto)")
        if self.replication_factor and self.min_insync_replicas > self.replication_factor:
            raise config.ConfigError(
                f"pipeline: min_insync_replicas {self.min_insync_replicas} exceeds replication_factor "
                f"{self.replication_factor}: every acks=all write would be refused"
            )
        owned = sorted(set(self.kafka) & set(OWNED_PROPERTIES))
        if owned:
            raise config.ConfigError(f"pipeline: kafka: {owned} are set by the roles and can't be overridden")

    @property
    def bootstrap_servers(self) -> str:
        """Empty when no Kafka is configured: the commands then start the embedded broker."""
        return str(self.kafka.get("bootstrap.servers", ""))

    def replication(self, brokers: int) -> tuple[int, int]:
        """(replicas, min in-sync replicas) of the pipeline's topics on a cluster of ``brokers``. 0 in the config
        means: as many replicas as brokers, at most 3, and one fewer in sync (at least 1), so one broker may
        go without losing an acknowledged write or stopping a producer."""
        factor = self.replication_factor or min(3, max(1, brokers))
        in_sync = self.min_insync_replicas or max(1, factor - 1)
        if in_sync > factor:
            raise config.ConfigError(f"pipeline: min_insync_replicas {in_sync} exceeds {factor} replicas")
        return factor, in_sync

    def model_key(self, environ: Mapping[str, str] | None = None) -> bytes | None:
        """The model-update HMAC key: ``$FPOCMH_MODEL_KEY``, else the file named by ``$FPOCMH_MODEL_KEY_FILE``
        or ``security.model_key_file`` (a Docker/Kubernetes secret), else ``security.model_key``; None: unsigned."""
        environ = os.environ if environ is None else environ
        if environ.get(MODEL_KEY_ENV):
            return environ[MODEL_KEY_ENV].encode()
        path = environ.get(MODEL_KEY_FILE_ENV) or self.security.model_key_file
        if path:
            try:
                key = Path(path).read_bytes().strip()
            except OSError as exc:
                raise config.ConfigError(f"pipeline: security.model_key_file {path}: {exc.strerror}") from exc
            if not key:
                raise config.ConfigError(f"pipeline: security.model_key_file {path} is empty")
            return key
        return self.security.model_key.encode() or None

    def with_bootstrap(self, servers: str) -> PipelineConfig:
        return dataclasses.replace(self, kafka=types.MappingProxyType({**self.kafka, "bootstrap.servers": servers}))


def kafka_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``FPOCMH_KAFKA_SASL_MECHANISMS=PLAIN`` -> ``{"sasl.mechanisms": "PLAIN"}``."""
    environ = os.environ if environ is None else environ
    return {
        key[len(KAFKA_ENV_PREFIX) :].lower().replace("_", "."): value
        for key, value in environ.items()
        if key.startswith(KAFKA_ENV_PREFIX)
    }


def _property_value(value: Any) -> str:
    # librdkafka takes strings; YAML turned "true" and "5" into a bool and an int.
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def load(
    path: str | Path | None = None,
    sets: Sequence[str] = (),
    bootstrap: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> PipelineConfig:
    """``config/pipeline.yaml``, then ``path``, environment, ``--set`` pairs and ``--bootstrap``."""
    overrides = config.parse_overrides(list(sets))
    kafka_sets = {k[len("kafka.") :]: v for k, v in overrides.items() if k.startswith("kafka.")}
    rest = {k: v for k, v in overrides.items() if not k.startswith("kafka.")}
    cfg = config.load(PipelineConfig, "pipeline", path, rest)
    props = {**cfg.kafka, **kafka_env(environ), **kafka_sets}
    if bootstrap:
        props["bootstrap.servers"] = bootstrap
    props = {key: _property_value(value) for key, value in props.items()}
    return dataclasses.replace(cfg, kafka=types.MappingProxyType(props))


def dump(cfg: PipelineConfig, path: str | Path) -> Path:
    """Write the effective config as YAML: child processes load it with ``--config`` and get the same tree."""
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A child runs one role and logs in as that role's principal, not as its parent's.
    cfg = dataclasses.replace(cfg, security=dataclasses.replace(cfg.security, login=""))
    path.write_text(yaml.safe_dump(config.to_dict(cfg), sort_keys=False))
    return path
