"""Is the broker there? What every Kafka client of a role reports, shown as a metric and one log line per change.

librdkafka retries a lost broker by itself and only says so in its own log lines, so a role could wait
for minutes without a word. Each role's clients report to one :class:`BrokerHealth` (their ``error_cb``);
it logs one line when the broker goes and one when it comes back, keeps ``fpocmh_broker_up`` current,
and, after ``broker.loss_timeout_s`` without a broker (0: never), makes the role stop with
:class:`BrokerLost`. The client library's own log lines go through Python logging as ``kafka.<role>``.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

log = logging.getLogger(__name__)

# Client errors that mean "no broker answers" (as opposed to a refused request).
LOST = {KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT, KafkaError._RESOLVE}
# Errors that mean "the broker refused who we are or what we asked": retrying changes nothing, so they
# are counted (fpocmh_broker_errors_total{kind}) and logged as errors, and a role stops on them.
REFUSED = {
    KafkaError._AUTHENTICATION: "authentication",
    KafkaError.SASL_AUTHENTICATION_FAILED: "authentication",
    KafkaError._SSL: "authentication",
    KafkaError.TOPIC_AUTHORIZATION_FAILED: "authorization",
    KafkaError.GROUP_AUTHORIZATION_FAILED: "authorization",
    KafkaError.CLUSTER_AUTHORIZATION_FAILED: "authorization",
    KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED: "authorization",
}


class BrokerUnavailable(RuntimeError):
    """No broker answered: at start-up within ``broker.connect_timeout_s``, or for ``loss_timeout_s`` later."""


class BrokerLost(BrokerUnavailable):
    """A running role has been without a broker for longer than ``broker.loss_timeout_s``."""


class BrokerRefused(BrokerUnavailable):
    """The broker refused the role's login, or a request the role's principal may not make."""


class BrokerHealth:
    """Broker reachability as one role's clients see it (thread-safe: librdkafka calls back on its threads)."""

    def __init__(self, role: str, bootstrap: str, loss_timeout_s: float, gauge: Any | None = None) -> None:
        self.role = role
        self.bootstrap = bootstrap
        self.loss_timeout_s = loss_timeout_s
        self.gauge = gauge
        # fpocmh_broker_errors_total, once the role's runtime hands it over.
        self.errors: Any | None = None
        self.down_since: float | None = None
        self.outages = 0
        # Every broker id the cluster's metadata has listed, and those it no longer lists.
        self.known: set[int] = set()
        self.missing: set[int] = set()
        self._lock = threading.Lock()
        self._set_gauge(1)

    def _set_gauge(self, value: int) -> None:
        if self.gauge is not None:
            self.gauge.labels(self.role).set(value)

    def on_error(self, err: KafkaError) -> None:
        """librdkafka's ``error_cb``."""
        if err.code() in LOST:
            self.count("transport")
            # On a cluster one broker's connection failing is not the broker lost: the metadata watch tells
            # which one went, and librdkafka says when none is left.
            if err.code() == KafkaError._ALL_BROKERS_DOWN or len(self.known) <= 1:
                self.lost(err.str())
        elif err.code() in REFUSED:
            self.refused(err)
        else:
            self.count("other")
            log.warning("%s: Kafka client error: %s", self.role, err.str())

    def count(self, kind: str) -> None:
        if self.errors is not None:
            self.errors.labels(self.role, kind).inc()

    def refused(self, err: KafkaError) -> BrokerRefused:
        """Count and log a refusal; returns the exception a role stops with."""
        kind = REFUSED.get(err.code(), "other")
        self.count(kind)
        log.error("%s: the broker at %s refused the %s: %s", self.role, self.bootstrap, kind, err.str())
        return BrokerRefused(f"{self.role}: the broker at {self.bootstrap} refused it ({kind}): {err.str()}")

    def lost(self, why: str) -> None:
        with self._lock:
            if self.down_since is not None:
                return
            self.down_since = time.monotonic()
            self.outages += 1
        self._set_gauge(0)
        then = (
            f"stopping after {self.loss_timeout_s:.0f} s without it (broker.loss_timeout_s)"
            if self.loss_timeout_s > 0
            else "retrying until it is back (broker.loss_timeout_s = 0)"
        )
        log.error("%s: lost the broker at %s (%s); %s", self.role, self.bootstrap, why, then)

    def back(self) -> None:
        with self._lock:
            since, self.down_since = self.down_since, None
        if since is not None:
            self._set_gauge(1)
            log.warning("%s: broker at %s is back after %.1f s", self.role, self.bootstrap, time.monotonic() - since)

    def brokers_listed(self, ids: set[int]) -> None:
        """The brokers a metadata answer listed: one line when some of the cluster's go missing, one when all
        are back. Not a loss of the broker: on a replicated cluster the role carries on without them."""
        with self._lock:
            self.known |= ids
            missing, gone, returned = self.known - ids, (self.known - ids) - self.missing, self.missing & ids
            self.missing = missing
        if gone:
            log.warning(
                "%s: broker(s) %s gone from the cluster's metadata (%d of %d listed); carrying on with the rest",
                self.role,
                sorted(gone),
                len(ids),
                len(self.known),
            )
        if returned and not missing:
            log.warning("%s: all %d brokers are back in the cluster's metadata", self.role, len(self.known))

    @property
    def is_up(self) -> bool:
        return self.down_since is None

    def check(self) -> None:
        """Raise :class:`BrokerLost` once the broker has been gone for longer than the loss timeout."""
        since = self.down_since
        if since is not None and self.loss_timeout_s > 0 and time.monotonic() - since > self.loss_timeout_s:
            raise BrokerLost(
                f"{self.role}: no broker at {self.bootstrap} for {time.monotonic() - since:.0f} s "
                f"(broker.loss_timeout_s = {self.loss_timeout_s:.0f}); stopping"
            )

    def probe(self, client: Any, timeout_s: float = 1.0) -> bool:
        """While down: one metadata request through ``client``; marks the broker back when it answers."""
        try:
            if client.list_topics(timeout=timeout_s).brokers:
                self.back()
                return True
        except KafkaException:
            pass
        return False


class BrokerWatch:
    """The brokers the cluster's metadata lists, asked every ``every_s`` on a thread of its own and handed to
    :meth:`BrokerHealth.brokers_listed` (and ``fpocmh_brokers``). Not in the role's loop: a transaction
    waiting for its lost coordinator holds that loop for as long as the outage lasts."""

    def __init__(self, admin: AdminClient, topic: str, health: BrokerHealth, gauge: Any, every_s: float) -> None:
        self.admin = admin
        self.topic = topic
        self.health = health
        self.gauge = gauge
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"fpocmh-{health.role}-brokers", daemon=True)

    def start(self) -> BrokerWatch:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            self.once()
            if self._stop.wait(self.every_s):
                return

    def once(self) -> None:
        try:
            ids = set(self.admin.list_topics(self.topic, timeout=1.0).brokers)
        except KafkaException:
            return  # no answer: the outage is the health's to report
        if ids:
            self.gauge.set(len(ids))
            self.health.brokers_listed(ids)


_ROLES: dict[str, BrokerHealth] = {}
_ROLES_LOCK = threading.Lock()


def for_role(role: str, bootstrap: str, loss_timeout_s: float) -> BrokerHealth:
    """The one :class:`BrokerHealth` of ``role`` in this process: every client the role makes reports to it,
    wherever it is made (producer, group consumer, topic readers, model follower)."""
    with _ROLES_LOCK:
        health = _ROLES.get(role)
        if health is None or health.bootstrap != bootstrap:
            health = _ROLES[role] = BrokerHealth(role, bootstrap, loss_timeout_s)
        return health


def client_logger(role: str) -> logging.Logger:
    """The logger librdkafka's lines go to for ``role``'s clients (quiet below WARNING unless -v)."""
    logger = logging.getLogger(f"kafka.{role}")
    if logger.level == logging.NOTSET and not logging.getLogger().isEnabledFor(logging.DEBUG):
        logger.setLevel(logging.WARNING)
    return logger


def require_reachable(conf: dict[str, Any], timeout_s: float, login_fix: str = "") -> None:
    """Raise :class:`BrokerUnavailable` with one line naming the address unless a broker answers in time,
    or :class:`BrokerRefused` naming the login and ``login_fix`` (what to set) once it refuses the login."""
    bootstrap = conf.get("bootstrap.servers", "")
    refusals: list[KafkaError] = []

    def on_error(err: KafkaError) -> None:
        if err.code() in REFUSED:
            refusals.append(err)

    admin = AdminClient({**conf, "logger": client_logger("connect"), "error_cb": on_error})
    deadline = time.monotonic() + timeout_s
    why = ""
    # Short metadata requests: a refused login shows (error_cb, served by poll) within one of them, so a
    # wrong password is told at once, not after the whole timeout.
    while not refusals and time.monotonic() < deadline:
        try:
            if admin.list_topics(timeout=min(1.0, timeout_s)).brokers:
                return
        except KafkaException as exc:
            why = f" ({exc.args[0].str()})"
        admin.poll(0)
    if refusals:
        user = conf.get("sasl.username", "")
        raise BrokerRefused(
            f"the broker at {bootstrap} refused the login{f' of {user}' if user else ''} "
            f"({refusals[0].str().rsplit(': ', 1)[-1]})" + (f"; {login_fix}" if login_fix else "")
        )
    raise BrokerUnavailable(
        f"no Kafka broker answered at {bootstrap} within {timeout_s:.0f} s{why}; "
        "check --bootstrap / kafka.bootstrap.servers, or start one with `fpocmh broker`"
    )
