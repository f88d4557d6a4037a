"""The secured broker, as a specification of what an unauthorised client gets (docs/security.md).

One secured Apache Kafka for the whole file (SASL/SCRAM-SHA-512 over TLS, StandardAuthorizer, the ACL
table of config/pipeline.yaml), reached over TCP like any neighbour on the network would.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from pipeline_support import fresh_metrics

from consumers import credentials, health, settings
from consumers.kafka import TOPIC_NAMES, ensure_topics, make_consumer, make_producer
from consumers.runtime import Runtime

pytestmark = [pytest.mark.broker, pytest.mark.secure_kafka]

# Topics whose records the pipeline trusts: a forged one would be stored, applied or coded.
TRUSTED = ("codes", "models", "arrivals")


@pytest.fixture(scope="session")
def secure_cfg(tmp_path_factory):
    """The pipeline config against a secured local broker, its topics created by the admin principal."""
    folder = tmp_path_factory.mktemp("secure")
    cfg = settings.load(None, [f"{s}.metrics_port=0" for s in ("encoder", "learner", "query", "replay")], environ={})
    with credentials.secured_broker(cfg, "kafka", folder) as secured:
        secured = credentials.for_command(secured, "test")
        ensure_topics(secured)
        yield secured


def as_role(cfg, role):
    """``cfg`` whose every client logs in as ``role``'s principal."""
    return dataclasses.replace(cfg, security=dataclasses.replace(cfg.security, login=role))


def ends(cfg, topic):
    """High watermarks of ``topic``, read by the admin principal."""
    reader = Consumer({"group.id": "ends", **{k: v for k, v in cfg.kafka.items()}, **credentials.login(cfg, "admin")})
    try:
        parts = reader.list_topics(topic, timeout=10).topics[topic].partitions
        return {p: reader.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts}
    finally:
        reader.close()


def try_produce(cfg, role, topic):
    """One forged record from ``role``'s principal; the broker's verdict (None: accepted)."""
    verdicts = []
    props = {"message.timeout.ms": 15000, "delivery.report.only.error": False}
    producer = make_producer(cfg, role, on_delivery=lambda err, msg: verdicts.append(err), **props)
    producer.produce(topic, b"forged", key=b"1:img")
    producer.flush(20)
    return verdicts[0] if verdicts else "no answer"


def not_granted(cfg, topic_key):
    """Roles (other than admin) the ACL table does not allow to write ``topic_key``."""
    return [
        role
        for role in cfg.security.principals
        if role != credentials.ADMIN and topic_key not in cfg.security.acls.get(role, {}).get("write", ())
    ]


def test_no_principal_without_a_write_acl_gets_a_forged_code_model_or_arrival_stored(secure_cfg):
    before = {key: ends(secure_cfg, getattr(secure_cfg.topics, key)) for key in TRUSTED}
    tried, accepted = [], []
    for key in TRUSTED:
        for role in not_granted(secure_cfg, key):
            verdict = try_produce(secure_cfg, role, getattr(secure_cfg.topics, key))
            tried.append((role, key))
            if verdict is None:
                accepted.append((role, key))
            else:
                assert verdict.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, (role, key, verdict)
    print(f"forged records accepted: {len(accepted)} of {len(tried)} tried ({tried})")
    assert ("client", "codes") in tried and ("client", "models") in tried and ("client", "arrivals") in tried
    assert accepted == []
    # Nothing reached the topics the shards' stores are built from.
    assert {key: ends(secure_cfg, getattr(secure_cfg.topics, key)) for key in TRUSTED} == before


def test_the_client_principal_writes_queries_and_reads_results_only(secure_cfg):
    client = as_role(secure_cfg, "client")
    assert try_produce(client, "query-client", secure_cfg.topics.queries) is None
    for key in ("results", "codes", "arrivals", "queries"):
        consumer = make_consumer(client, "query-client", None, 10)
        consumer.assign([TopicPartition(getattr(secure_cfg.topics, key), 0, 0)])
        errors = [m.error().code() for m in consumer.consume(10, 3) if m.error() is not None]
        consumer.close()
        refused = KafkaError.TOPIC_AUTHORIZATION_FAILED in errors
        assert refused == (key != "results"), (key, errors)


def test_a_refused_read_stops_a_role_loudly_and_counts_the_error(secure_cfg):
    metrics = fresh_metrics()
    client = as_role(secure_cfg, "client")
    rt = Runtime(client, "query-client", metrics)
    consumer = make_consumer(client, "query-client", None, 10)
    consumer.assign([TopicPartition(secure_cfg.topics.codes, 0, 0)])
    with pytest.raises(health.BrokerRefused, match="authorization"):
        for _ in range(10):
            rt.decode_all(consumer.consume(10, 1), lambda m: m.value())
    consumer.close()
    assert metrics.broker_errors.labels("query-client", "authorization")._value.get() == 1


def test_the_encoder_principal_holds_its_transactional_ids_and_the_client_none(secure_cfg):
    prefix = secure_cfg.encoder.group
    encoder = make_producer(as_role(secure_cfg, "encoder"), "encoder", **{"transactional.id": f"{prefix}-test-0"})
    encoder.init_transactions(30)
    forger = make_producer(as_role(secure_cfg, "client"), "query-client", **{"transactional.id": f"{prefix}-test-1"})
    with pytest.raises(Exception, match="TRANSACTIONAL_ID_AUTHORIZATION_FAILED|ransactional"):
        forger.init_transactions(15)


def test_a_plaintext_client_cannot_connect_to_the_secured_listener(secure_cfg):
    before = ends(secure_cfg, secure_cfg.topics.codes)
    plain = {"bootstrap.servers": secure_cfg.bootstrap_servers, "log_level": 0}
    with pytest.raises(KafkaException):  # no metadata: the TLS listener drops the plaintext connection
        AdminClient(plain).list_topics(timeout=3)
    verdicts = []
    producer = Producer({**plain, "message.timeout.ms": 3000, "on_delivery": lambda err, msg: verdicts.append(err)})
    producer.produce(secure_cfg.topics.codes, b"forged", key=b"1:img")
    producer.flush(10)
    assert [v.code() for v in verdicts] == [KafkaError._MSG_TIMED_OUT]
    assert ends(secure_cfg, secure_cfg.topics.codes) == before


def role_command(cfg, tmp_path, env):
    """``fpocmh encode`` on ``cfg`` with ``env`` on top of a clean environment; (exit code, stderr)."""
    path = settings.dump(cfg, tmp_path / "pipeline.yaml")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("FPOCMH_SASL_", "FPOCMH_CREDENTIALS"))}
    done = subprocess.run(
        [sys.executable, "-m", "fpocmh", "encode", "--config", str(path)],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.returncode, done.stderr.strip().splitlines()


def test_a_role_with_a_wrong_password_never_starts_and_says_what_to_set(secure_cfg, tmp_path):
    code, lines = role_command(secure_cfg, tmp_path, {credentials.password_env("encoder"): "wrong"})
    assert code != 0
    assert "refused the login of fpocmh-encoder" in lines[-1]
    assert credentials.password_env("encoder") in lines[-1]


def test_a_role_without_a_password_never_starts_and_says_what_to_set(secure_cfg, tmp_path):
    empty = dataclasses.replace(
        secure_cfg, security=dataclasses.replace(secure_cfg.security, credentials_dir=str(tmp_path / "none"))
    )
    code, lines = role_command(empty, tmp_path, {})
    assert code == 2
    assert lines[-1].startswith("fpocmh encode: error: encoder: no broker password for fpocmh-encoder")
    assert credentials.password_env("encoder") in lines[-1] and str(tmp_path / "none" / "fpocmh-encoder") in lines[-1]


def test_the_acl_table_names_only_configured_topics_and_every_principal_describes_them(secure_cfg):
    bindings = credentials.acl_bindings(secure_cfg)
    topics = {getattr(secure_cfg.topics, name) for name in TOPIC_NAMES}
    assert {b.name for b in bindings if b.restype.name == "TOPIC"} == topics
    users = {b.principal for b in bindings}
    assert users == {f"User:{p}" for r, p in secure_cfg.security.principals.items() if r != credentials.ADMIN}


def test_topics_provision_gives_every_principal_the_password_in_its_secret_file(secure_cfg, tmp_path):
    """What the secured compose deployment's topics-init does: the passwords `fpocmh secrets` drew become
    the principals' SCRAM logins (the admin's is the one it already logs in with), the ACLs are applied."""
    from consumers.brokers.secrets_folder import write_secrets
    from fpocmh import cli

    old_folder = secure_cfg.security.credentials_dir
    drawn = tmp_path / "secrets"
    write_secrets(drawn, secure_cfg.security.principals, credentials.ADMIN, host="localhost")
    admin = secure_cfg.security.principals[credentials.ADMIN]
    (drawn / admin).write_text(Path(old_folder, admin).read_text())
    redrawn = dataclasses.replace(
        secure_cfg, security=dataclasses.replace(secure_cfg.security, credentials_dir=str(drawn))
    )
    try:
        assert cli.main(["topics", "--provision", "--config", str(settings.dump(redrawn, tmp_path / "c.yaml"))]) == 0
        assert try_produce(as_role(redrawn, "encoder"), "encoder", secure_cfg.topics.codes) is None
        assert try_produce(as_role(redrawn, "client"), "query-client", secure_cfg.topics.codes) is not None
        with pytest.raises(KafkaException):  # the password it had before no longer logs in
            AdminClient({**secure_cfg.kafka, **credentials.login(as_role(secure_cfg, "encoder"))}).list_topics(
                timeout=5
            )
    finally:
        credentials.provision_users(secure_cfg)  # the other tests' passwords back
