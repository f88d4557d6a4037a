"""Every Prometheus metric of the system, in one place.

Naming follows Prometheus rules: ``fpocmh_`` prefix, base units, ``_total`` counters, ``_seconds``
histograms, labels from small fixed sets only (role, topic, partition, modality, term, direction,
queries, reason). Pass a private ``registry`` in tests; roles in one process (``fpocmh run``) share one
:class:`Metrics` and are told apart by the ``role`` label.
"""

from __future__ import annotations

import logging
import os

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

ROLES = ("replay", "encoder", "learner", "query")
MODALITIES = ("img", "txt")
# schema/decode: unreadable; shape: lengths the model can't take; invalid: non-finite values, labels that
# are not 0/1, item ids out of range; oversize: over the message limit (dead-lettered as a bounded
# record); process: raised while processed alone; model: a model version refused.
DEAD_LETTER_REASONS = ("schema", "decode", "shape", "invalid", "oversize", "process", "model")
# Where /metrics listens when the caller names no address; containers set it to 0.0.0.0 so that
# Prometheus, in its own container, can reach them.
METRICS_ADDR_ENV = "FPOCMH_METRICS_ADDR"
# Up to a minute: a learner batch or a replayed batch of queries on a busy machine takes seconds, and
# a quantile above the last finite bucket would only show that bucket's bound.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Finer below 2 ms, where a shard's hashing and index search lie (and the index's 2 ms target).
SEARCH_BUCKETS = (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.01, 0.025, 0.05, 0.1, 1.0)
# Decades up to 10^8: codes compared per query run from a few (multi-index hashing) to every code (a scan).
COUNT_BUCKETS = (1, 10, 100, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8)


class Metrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        self.messages_consumed = Counter(
            "fpocmh_messages_consumed_total", "Messages consumed", ["role", "topic"], registry=registry
        )
        self.messages_produced = Counter(
            "fpocmh_messages_produced_total", "Messages produced and acknowledged", ["role", "topic"], registry=registry
        )
        self.batch_duration = Histogram(
            "fpocmh_batch_duration_seconds",
            "Time to process one polled batch, decode to commit",
            ["role"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.consumer_lag = Gauge(
            "fpocmh_consumer_lag",
            "Messages behind the high watermark, per partition",
            ["role", "topic", "partition"],
            registry=registry,
        )
        self.dead_letters = Counter(
            "fpocmh_dead_letters_total", "Messages sent to the dead-letter topic", ["role", "reason"], registry=registry
        )
        self.broker_up = Gauge(
            "fpocmh_broker_up",
            "1 while the role's Kafka clients reach a broker, 0 during an outage",
            ["role"],
            registry=registry,
        )
        # kind: authentication (login refused, TLS), authorization (a request the principal may not make),
        # transport (no broker answers), other.
        self.broker_errors = Counter(
            "fpocmh_broker_errors_total",
            "Errors the role's Kafka clients reported, by kind",
            ["role", "kind"],
            registry=registry,
        )
        self.brokers = Gauge(
            "fpocmh_brokers",
            "Brokers the cluster's metadata lists, as the role last asked (a lost broker drops out once the "
            "controller fences it, while the role's topics carry on on their other replicas)",
            ["role"],
            registry=registry,
        )
        self.topic_resets = Counter(
            "fpocmh_topic_resets_total",
            "Input topics found recreated or behind the role's saved offsets (the stream restarted)",
            ["role", "topic"],
            registry=registry,
        )
        self.learner_rollbacks = Counter(
            "fpocmh_learner_rollbacks_total",
            "Learner batches undone because a loss, gradient or parameter was not finite, or learning raised",
            registry=registry,
        )
        self.model_refused = Counter(
            "fpocmh_model_refused_total",
            "Model versions refused: unsigned or wrongly signed, version mismatch, non-finite or collapsed",
            ["role"],
            registry=registry,
        )
        self.learner_items = Counter(
            "fpocmh_learner_items_total",
            "Stream arrivals by what the learner did with them: learned; coded (by the learner, not learnt: "
            "DLCH with an unlabelled or unpaired item); known (already coded); offline (version 0's part); "
            "skipped (read, not learnt, to keep the lag within learner.pacing)",
            ["outcome"],
            registry=registry,
        )
        self.learner_codes = Counter(
            "fpocmh_learner_codes_total",
            "Codes the learner assigned itself, by outcome: written (after the encoder's code of the view), "
            "dropped (held past learner.max_held_codes or at a stop: the view keeps the encoder's code)",
            ["outcome"],
            registry=registry,
        )
        self.learner_codes_held = Gauge(
            "fpocmh_learner_codes_held",
            "Learner codes waiting for the encoder group to commit past the arrivals they code",
            registry=registry,
        )
        self.learner_views_uncoded = Gauge(
            "fpocmh_learner_views_uncoded",
            "Views the learner learnt whose learner codes wait for a full block or a pause (FPO-CMH)",
            registry=registry,
        )
        self.learner_pending = Gauge(
            "fpocmh_learner_pending",
            "Arrivals a buffering learner holds undecided (DLCH's open increment)",
            registry=registry,
        )
        self.learner_share = Gauge(
            "fpocmh_learner_learn_share",
            "Share of arrivals the learner learns from (1 while it keeps pace)",
            registry=registry,
        )
        self.learner_drift = Gauge(
            "fpocmh_learner_stored_minus_rehashed_map",
            "FPO-CMH's last self-check: mAP over the reservoir's stored codes of this modality minus over the same "
            "items re-hashed now (negative: the model ran ahead of its stored codes)",
            ["modality"],
            registry=registry,
        )
        self.learner_rehearsal_weight = Gauge(
            "fpocmh_learner_rehearsal_weight",
            "Stored-code rehearsal weight of this modality's network, as FPO-CMH's self-check set it",
            ["modality"],
            registry=registry,
        )
        self.learner_lr_scale = Gauge(
            "fpocmh_learner_lr_scale",
            "Factor on the learning-rate schedule of this modality's network, as FPO-CMH's self-check set it "
            "(below 1 once the rehearsal weight is at its maximum and the model still runs ahead)",
            ["modality"],
            registry=registry,
        )
        self.learner_steps = Counter(
            "fpocmh_learner_steps_total", "Optimiser steps per modality", ["modality"], registry=registry
        )
        self.learner_loss = Gauge(
            "fpocmh_learner_loss", "Mean loss term of the last batch", ["term"], registry=registry
        )
        self.bank_rows = Gauge("fpocmh_bank_rows", "Rows (categories) in the anchor bank", registry=registry)
        self.model_version = Gauge(
            "fpocmh_model_version",
            "Model version published (learner) or in use (encoder, query)",
            ["role"],
            registry=registry,
        )
        self.model_published = Gauge(
            "fpocmh_model_published_timestamp_seconds",
            "Unix time the model version in use was published; its age is time() minus this",
            ["role"],
            registry=registry,
        )
        self.model_updates = Counter(
            "fpocmh_model_updates_total",
            "Model versions published (learner) or applied (others)",
            ["role"],
            registry=registry,
        )
        self.model_update_bytes = Histogram(
            "fpocmh_model_update_bytes",
            "Serialized size of a published model update",
            buckets=(1e4, 1e5, 1e6, 4e6, 1.6e7, 6.4e7),
            registry=registry,
        )
        self.store_codes = Gauge(
            "fpocmh_store_codes",
            "Codes held by the query store (shard s/S, or all)",
            ["shard", "modality"],
            registry=registry,
        )
        self.store_ready = Gauge(
            "fpocmh_store_ready", "1 once the query store has read the codes topic to its end", registry=registry
        )
        self.store_offsets_behind = Gauge(
            "fpocmh_store_offsets_behind",
            "Codes-topic messages of the shard's partitions not yet in its store (high watermark minus next offset)",
            ["shard"],
            registry=registry,
        )
        self.store_snapshot_time = Gauge(
            "fpocmh_store_snapshot_timestamp_seconds",
            "Unix time of the snapshot the store last wrote or loaded; its age is time() minus this",
            ["shard"],
            registry=registry,
        )
        self.store_index_info = Gauge(
            "fpocmh_store_index_info",
            "1 for the Hamming index kind the shard's store searches with (query.index)",
            ["shard", "kind"],
            registry=registry,
        )
        self.store_index_table_bytes = Gauge(
            "fpocmh_store_index_table_bytes",
            "Bytes the shard's index holds beyond the ids and codes themselves (0 for the flat scan)",
            ["shard", "modality"],
            registry=registry,
        )
        self.query_hash_duration = Histogram(
            "fpocmh_query_hash_seconds",
            "Seconds one request spent hashing its query features in the shard",
            ["shard"],
            buckets=SEARCH_BUCKETS,
            registry=registry,
        )
        self.query_index_duration = Histogram(
            "fpocmh_query_index_search_seconds",
            "Seconds one request spent searching the shard's index with its hashed queries",
            ["shard"],
            buckets=SEARCH_BUCKETS,
            registry=registry,
        )
        self.query_index_probes = Histogram(
            "fpocmh_query_index_probes",
            "Hash-table buckets one query looked up in the shard's index (0 for the flat scan)",
            ["shard"],
            buckets=COUNT_BUCKETS,
            registry=registry,
        )
        self.query_index_candidates = Histogram(
            "fpocmh_query_index_candidates",
            "Stored codes whose distance one query computed in the shard (every code for the flat scan)",
            ["shard"],
            buckets=COUNT_BUCKETS,
            registry=registry,
        )
        self.store_rebuilds = Counter(
            "fpocmh_store_rebuilds_total",
            "Stores rebuilt from the beginning because the codes topic was reset under them",
            ["shard"],
            registry=registry,
        )
        self.query_answers = Counter(
            "fpocmh_query_answers_total",
            "Answers by status: each shard's (role=query) and the client's merged ones (role=replay)",
            ["role", "status"],
            registry=registry,
        )
        self.query_duration = Histogram(
            "fpocmh_query_duration_seconds",
            "Query latency: request consumed to answer produced (role=query), or round trip (role=replay)",
            ["role"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        # queries: all, or (protocols with new labels) those with a new label (new) and the others (old)
        self.retrieval_map = Gauge(
            "fpocmh_retrieval_map",
            "Live retrieval mAP of the replayed query set",
            ["direction", "queries"],
            registry=registry,
        )

    def serve(self, port: int, addr: str | None = None) -> None:
        """Expose ``/metrics`` on ``addr:port`` (0: off); no ``addr``: :func:`metrics_addr`.

        A port already taken (a second copy of a role on the same host) costs the role its metrics,
        not its work: it logs why and keeps going."""
        if not port:
            return
        addr = addr or metrics_addr()
        try:
            start_http_server(port, addr=addr, registry=self.registry)
        except OSError as exc:
            log.warning("metrics: cannot serve on %s:%d (%s); give this copy its own metrics_port", addr, port, exc)
            return
        log.info("metrics: serving http://%s:%d/metrics", addr, port)


def metrics_addr() -> str:
    """Where roles serve /metrics: ``$FPOCMH_METRICS_ADDR``, else loopback."""
    return os.environ.get(METRICS_ADDR_ENV, "127.0.0.1")
