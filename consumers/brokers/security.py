"""A secured local Apache Kafka: SASL/SCRAM-SHA-512 over TLS, the StandardAuthorizer, one principal per role.

What :class:`BrokerSecurity` adds to a launched node (docs/security.md):

- a throwaway CA and a broker certificate for the host (and localhost, 127.0.0.1), made at start with
  ``cryptography`` and kept in the broker's folder; clients trust the CA file (``ssl.ca.location``);
- the client listener (``SECURED``, the bootstrap address) speaks SASL_SSL with SCRAM-SHA-512 only;
- the controller and inter-broker listeners stay on loopback and speak SASL/PLAIN with a random broker
  password that lives only in the node's properties file (mode 0600). Not PLAINTEXT: with
  ``allow.everyone.if.no.acl.found=false`` a PLAINTEXT inter-broker listener would need ``User:ANONYMOUS``
  as a super user, which any process on the host could then be. Not SCRAM: KRaft controllers cannot check
  SCRAM, whose credentials live in the metadata they serve;
- ``StandardAuthorizer``, ``allow.everyone.if.no.acl.found=false``; super users: the broker and the admin
  principal (the operator that creates topics and ACLs);
- once the node answers, the launcher logs in on the inter-broker listener, creates a SCRAM user per
  principal with a fresh random password (each written to ``<credentials_dir>/<principal>``, mode 0600,
  never on a command line) and applies the ACL table of the pipeline config (:func:`acl_bindings`).

The ACL table itself is config (``security.acls``, by topic key and role): this module only turns it into
bindings. Nothing here imports a role.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from consumers.brokers.process import BrokerError

MECHANISM = "SCRAM-SHA-512"
SCRAM_ITERATIONS = 8192
# The broker's own PLAIN login on its loopback listeners.
BROKER_USER = "broker"
CA_FILE = "ca.pem"
KEYSTORE_FILE = "broker.pem"
# What each verb of the ACL table grants. WRITE and READ imply DESCRIBE on Kafka; a transactional id
# needs WRITE (DESCRIBE implied) and a group READ (join, commit, fetch offsets).
VERBS = ("read", "write", "groups", "describe_groups", "transactional_ids")


def write_private(path: Path, data: bytes) -> Path:
    """Write ``data`` readable by this user only (secrets: keys and passwords)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    return path


def make_tls(directory: Path, host: str, days: int = 7, keystore_name: str = KEYSTORE_FILE) -> tuple[Path, Path]:
    """A throwaway CA (``ca.pem``) and a broker key + certificate it signed (``keystore_name``, a PEM
    keystore) for ``host``, localhost and 127.0.0.1, valid for ``days``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    valid = {"not_valid_before": now - datetime.timedelta(minutes=5), "not_valid_after": now + datetime.timedelta(days)}
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fpocmh throwaway CA")])
    ca = (
        x509.CertificateBuilder(subject_name=ca_name, issuer_name=ca_name, **valid)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    for name in dict.fromkeys([host, "127.0.0.1"]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            names.append(x509.DNSName(name))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder(
            subject_name=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]), issuer_name=ca_name, **valid
        )
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    ca_path = directory / CA_FILE
    ca_path.write_bytes(ca.public_bytes(pem))
    # Kafka's PEM keystore: a PKCS#8 key, then the certificate chain.
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    keystore = write_private(directory / keystore_name, key_pem + cert.public_bytes(pem) + ca.public_bytes(pem))
    return ca_path, keystore


def plain_login(user: str, password: str) -> str:
    """A client's PLAIN login module (``sasl.jaas.config``)."""
    return f'org.apache.kafka.common.security.plain.PlainLoginModule required username="{user}" password="{password}";'


def plain_jaas(password: str, users: Mapping[str, str] | None = None) -> str:
    """The PLAIN login module of a listener: the broker logs in with ``password``; it and ``users``
    (name -> password) may log in."""
    accepted = {BROKER_USER: password, **(users or {})}
    own = plain_login(BROKER_USER, password).removesuffix(";")
    return own + "".join(f' user_{name}="{pw}"' for name, pw in accepted.items()) + ";"


def upsert_scram_users(admin_conf: Mapping[str, Any], passwords: Mapping[str, str], timeout_s: float = 30.0) -> None:
    """Create or reset a SCRAM-SHA-512 user per ``passwords`` entry (user -> password), logged in with
    ``admin_conf`` (a super user's librdkafka properties)."""
    from confluent_kafka.admin import AdminClient, ScramCredentialInfo, ScramMechanism, UserScramCredentialUpsertion

    info = ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, SCRAM_ITERATIONS)
    upserts = [UserScramCredentialUpsertion(user, info, pw.encode()) for user, pw in passwords.items()]
    admin = AdminClient(dict(admin_conf))
    for future in admin.alter_user_scram_credentials(upserts, request_timeout=timeout_s).values():
        future.result(timeout_s)


@dataclass
class BrokerSecurity:
    """The secured listeners of one local node and the principals it serves.

    ``principals``: role -> SCRAM user name (``security.principals``); ``admin_role`` names the super user
    among them. Passwords are drawn at :meth:`provision` and written to ``credentials_dir``.
    """

    credentials_dir: Path
    principals: Mapping[str, str]
    admin_role: str = "admin"
    broker_password: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    ca_file: Path | None = None
    internal_port: int | None = None
    bootstrap: str = ""

    @property
    def admin(self) -> str:
        return self.principals[self.admin_role]

    def server_properties(self, host: str, port: int, controller_port: int, directory: Path) -> dict[str, str]:
        """The node's listeners and authorizer; the TLS files are made in ``directory`` on first use."""
        from consumers.brokers.process import free_port

        keystore = directory / KEYSTORE_FILE
        if self.ca_file is None or not keystore.is_file():
            self.ca_file, keystore = make_tls(directory, host)
        self.internal_port = self.internal_port or free_port("127.0.0.1")
        internal, controller = f"127.0.0.1:{self.internal_port}", f"127.0.0.1:{controller_port}"
        self.bootstrap = f"{host}:{port}"
        jaas = plain_jaas(self.broker_password)
        return {
            "listeners": f"SECURED://{host}:{port},INTERNAL://{internal},CONTROLLER://{controller}",
            "advertised.listeners": f"SECURED://{host}:{port},INTERNAL://{internal}",
            "listener.security.protocol.map": "SECURED:SASL_SSL,INTERNAL:SASL_PLAINTEXT,CONTROLLER:SASL_PLAINTEXT",
            "inter.broker.listener.name": "INTERNAL",
            "controller.quorum.voters": f"1@{controller}",
            "sasl.mechanism.inter.broker.protocol": "PLAIN",
            "sasl.mechanism.controller.protocol": "PLAIN",
            "listener.name.internal.sasl.enabled.mechanisms": "PLAIN",
            "listener.name.internal.plain.sasl.jaas.config": jaas,
            "listener.name.controller.sasl.enabled.mechanisms": "PLAIN",
            "listener.name.controller.plain.sasl.jaas.config": jaas,
            "listener.name.secured.sasl.enabled.mechanisms": MECHANISM,
            "listener.name.secured.scram-sha-512.sasl.jaas.config": (
                "org.apache.kafka.common.security.scram.ScramLoginModule required;"
            ),
            "listener.name.secured.ssl.keystore.type": "PEM",
            "listener.name.secured.ssl.keystore.location": str(keystore),
            "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "allow.everyone.if.no.acl.found": "false",
            "super.users": f"User:{BROKER_USER};User:{self.admin}",
        }

    def internal_client(self) -> dict[str, Any]:
        """librdkafka properties of the broker's own login on its loopback inter-broker listener."""
        return {
            "bootstrap.servers": f"127.0.0.1:{self.internal_port}",
            "security.protocol": "SASL_PLAINTEXT",
            "sasl.mechanisms": "PLAIN",
            "sasl.username": BROKER_USER,
            "sasl.password": self.broker_password,
        }

    def client_properties(self) -> dict[str, str]:
        """What every client of the secured listener sets besides its login (the ``kafka:`` mapping)."""
        return {"security.protocol": "SASL_SSL", "sasl.mechanisms": MECHANISM, "ssl.ca.location": str(self.ca_file)}

    def provision(self, timeout_s: float = 30.0) -> dict[str, str]:
        """A SCRAM user per principal with a fresh password, each written to ``credentials_dir/<principal>``;
        returns principal -> password (the launcher's own copy, for its admin login)."""
        self.credentials_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.credentials_dir, 0o700)
        passwords = {user: secrets.token_urlsafe(24) for user in self.principals.values()}
        upsert_scram_users(self.internal_client(), passwords, timeout_s)
        for user, password in passwords.items():
            write_private(self.credentials_dir / user, password.encode())
        self._wait_for_login(passwords[self.admin], timeout_s)
        return passwords

    def apply_acls(self, bindings: Iterable[Any], timeout_s: float = 30.0) -> int:
        """Create ``bindings`` (super-user login on the inter-broker listener); returns how many."""
        from confluent_kafka.admin import AdminClient

        bindings = list(bindings)
        admin = AdminClient(self.internal_client())
        for future in admin.create_acls(bindings, request_timeout=timeout_s).values():
            future.result(timeout_s)
        return len(bindings)

    def _wait_for_login(self, password: str, timeout_s: float) -> None:
        """Until the new admin user logs in on the secured listener: SCRAM users reach the listener's
        authenticator through the metadata log, a moment after the upsert returned."""
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient

        conf = {
            **self.client_properties(),
            "bootstrap.servers": self.bootstrap,
            "sasl.username": self.admin,
            "sasl.password": password,
            "log_level": 0,
        }
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if AdminClient(conf).list_topics(timeout=2).brokers:
                    return
            except KafkaException:
                time.sleep(0.2)
        raise BrokerError(f"the admin user {self.admin} could not log in within {timeout_s:.0f} s")


# ------------------------------------------------------------------------------------------- ACLs


def acl_bindings(
    table: Mapping[str, Mapping[str, Any]],
    principals: Mapping[str, str],
    topics: Mapping[str, str],
    groups: Mapping[str, str],
    transactional_ids: Mapping[str, str],
) -> list[Any]:
    """The ACL table (role -> verb -> keys) as Kafka bindings for each role's principal.

    Topics are named by their key under ``topics:`` (literal names); groups and transactional ids by the
    role whose configured name they start with (prefixed: shards add ``-<s>of<S>``, encoders
    ``-<host>-<slot>``, assign-only readers ``-reader-<id>``). Every principal also gets DESCRIBE on every
    pipeline topic: each role checks at start that the topics exist (metadata, ListOffsets), which shows
    partitions and offsets, never a record.
    """
    from confluent_kafka.admin import (
        AclBinding,
        AclOperation,
        AclPermissionType,
        ResourcePatternType,
        ResourceType,
    )

    allow = AclPermissionType.ALLOW
    literal, prefixed = ResourcePatternType.LITERAL, ResourcePatternType.PREFIXED
    grants = {
        "read": (ResourceType.TOPIC, literal, topics, AclOperation.READ),
        "write": (ResourceType.TOPIC, literal, topics, AclOperation.WRITE),
        "groups": (ResourceType.GROUP, prefixed, groups, AclOperation.READ),
        "describe_groups": (ResourceType.GROUP, prefixed, groups, AclOperation.DESCRIBE),
        "transactional_ids": (ResourceType.TRANSACTIONAL_ID, prefixed, transactional_ids, AclOperation.WRITE),
    }
    out = []
    for role, verbs in table.items():
        if role not in principals:
            raise ValueError(f"security.acls: {role!r} is not a role of security.principals ({sorted(principals)})")
        unknown = sorted(set(verbs) - set(VERBS))
        if unknown:
            raise ValueError(f"security.acls.{role}: unknown verb(s) {unknown}; known: {list(VERBS)}")
        user = f"User:{principals[role]}"
        for verb, keys in verbs.items():
            kind, pattern, names, operation = grants[verb]
            for key in keys or ():
                if key not in names:
                    raise ValueError(f"security.acls.{role}.{verb}: {key!r} is not one of {sorted(names)}")
                out.append(AclBinding(kind, names[key], pattern, user, "*", operation, allow))
        out += [
            AclBinding(ResourceType.TOPIC, name, literal, user, "*", AclOperation.DESCRIBE, allow)
            for name in topics.values()
        ]
    return out
