"""Who a Kafka client logs in as, and with which password: one principal per role (docs/security.md).

With ``security.broker_login`` on, every client of a role logs in (SASL) as the principal
``security.principals`` gives that role. The password comes from ``$FPOCMH_SASL_PASSWORD_<ROLE>``, else
from the file ``<credentials folder>/<principal>`` (one file per principal, as Docker and Kubernetes
mount secrets; the folder is ``$FPOCMH_CREDENTIALS_DIR``, else ``security.credentials_dir``). Never from
the command line: ``--set kafka.sasl.password=...`` would sit in every process listing, so it is refused.
A missing credential is one line naming what to set.

Clients name their role as the runtime does (``encoder``, ``learner``, ``query-client``, ...); clients
no role owns (topic creation, metadata) log in as the process's role, ``security.login``, which each
command fills in for itself (:func:`for_command`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
import types
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from consumers.settings import PipelineConfig
from fpocmh_core.config import ConfigError

log = logging.getLogger(__name__)

PASSWORD_ENV = "FPOCMH_SASL_PASSWORD_"  # noqa: S105 (the name of a variable, not a password)
CREDENTIALS_DIR_ENV = "FPOCMH_CREDENTIALS_DIR"
ADMIN = "admin"
# Client role names (as the runtime gives them) that log in as another role's principal.
CLIENT_ROLES = {"learner-codes": "learner", "query-client": "client"}
# The principal a command's own clients use; every other command is the operator's (admin).
COMMAND_LOGINS = {
    "encode": "encoder",
    "learn": "learner",
    "serve-queries": "query",
    "replay": "replay",
    "query": "client",
}
# Set from the credentials, never from the kafka: mapping.
LOGIN_PROPERTIES = ("sasl.username", "sasl.password")


def for_command(cfg: PipelineConfig, command: str) -> PipelineConfig:
    """``cfg`` whose role-less clients log in as ``command``'s role (unless ``security.login`` names one)."""
    if cfg.security.login:
        return cfg
    login = COMMAND_LOGINS.get(command, ADMIN)
    return dataclasses.replace(cfg, security=dataclasses.replace(cfg.security, login=login))


def role_of(cfg: PipelineConfig, client_role: str | None = None) -> str:
    """The role whose principal a client of ``client_role`` logs in as (None: a client of the process)."""
    role = CLIENT_ROLES.get(client_role or "", client_role)
    return role if role in cfg.security.principals else cfg.security.login or ADMIN


def password_env(role: str) -> str:
    return PASSWORD_ENV + role.upper().replace("-", "_")


def credentials_dir(cfg: PipelineConfig, environ: Mapping[str, str]) -> str:
    return environ.get(CREDENTIALS_DIR_ENV) or cfg.security.credentials_dir


def where(cfg: PipelineConfig, role: str, environ: Mapping[str, str] | None = None) -> str:
    """What to set for ``role``'s password, in words (for error lines)."""
    environ = os.environ if environ is None else environ
    folder = credentials_dir(cfg, environ)
    principal = cfg.security.principals[role]
    file = f"the file {Path(folder) / principal}" if folder else f"a file {principal} in ${CREDENTIALS_DIR_ENV}"
    return f"set ${password_env(role)} or {file}"


def login(
    cfg: PipelineConfig, client_role: str | None = None, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """``sasl.username`` / ``sasl.password`` of ``client_role``'s principal (None: the process's, as topic
    and metadata clients log in); ``{}`` without broker login."""
    if not cfg.security.broker_login:
        return {}
    environ = os.environ if environ is None else environ
    given = sorted(set(cfg.kafka) & set(LOGIN_PROPERTIES))
    if given:
        raise ConfigError(
            f"pipeline: kafka: {given} with security.broker_login on: each role's login comes from "
            f"${PASSWORD_ENV}<ROLE> or {CREDENTIALS_DIR_ENV}/<principal>, not from the client properties"
        )
    role = role_of(cfg, client_role)
    if role not in cfg.security.principals:
        raise ConfigError(f"pipeline: security.principals has no {role!r}, which {client_role!r} logs in as")
    principal = cfg.security.principals[role]
    password = environ.get(password_env(role), "")
    folder = credentials_dir(cfg, environ)
    if not password and folder:
        path = Path(folder) / principal
        try:
            password = path.read_text().strip()
        except FileNotFoundError:
            password = ""
        except OSError as exc:
            raise ConfigError(f"{role}: broker password file {path}: {exc.strerror}") from None
    if not password:
        raise ConfigError(f"{role}: no broker password for {principal}: {where(cfg, role, environ)}")
    return {"sasl.username": principal, "sasl.password": password}


def secured(cfg: PipelineConfig, bootstrap: str, client_properties: Mapping[str, str], folder: Path) -> PipelineConfig:
    """``cfg`` against a secured broker: its address and TLS/SASL client properties, and the login of each
    role from the password files in ``folder``."""
    kafka = {**cfg.kafka, **client_properties, "bootstrap.servers": bootstrap}
    security = dataclasses.replace(cfg.security, broker_login=True, credentials_dir=str(folder))
    return dataclasses.replace(cfg, kafka=types.MappingProxyType(kafka), security=security)


def acl_bindings(cfg: PipelineConfig) -> list[Any]:
    """``security.acls`` as Kafka ACL bindings, resolved against the config's topic, group and id names."""
    from consumers.brokers.security import acl_bindings as bindings

    topics = {name: getattr(cfg.topics, name) for name in dataclasses.asdict(cfg.topics)}
    groups = {"encoder": cfg.encoder.group, "learner": cfg.learner.group, "query": cfg.query.group}
    ids = {"encoder": cfg.encoder.transactional_id or cfg.encoder.group}
    return bindings(cfg.security.acls, cfg.security.principals, topics, groups, ids)


def apply_acls(cfg: PipelineConfig, timeout_s: float = 30.0) -> int:
    """Create :func:`acl_bindings` on ``cfg``'s cluster, logged in as the admin principal (which must be
    allowed to alter ACLs: a super user, or ALTER on the cluster); returns how many."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": cfg.bootstrap_servers, **cfg.kafka, **login(cfg, ADMIN)})
    bindings = acl_bindings(cfg)
    for future in admin.create_acls(bindings, request_timeout=timeout_s).values():
        future.result(timeout_s)
    return len(bindings)


def provision_users(cfg: PipelineConfig, timeout_s: float = 30.0) -> int:
    """A SCRAM user per principal with the password the roles will read (:func:`login`), created or reset
    as the admin principal, who must be able to log in already (PLAIN on the broker's internal listener in
    the compose deployment); returns how many."""
    from consumers.brokers.security import upsert_scram_users

    passwords = {cfg.security.principals[role]: login(cfg, role)["sasl.password"] for role in cfg.security.principals}
    admin = {"bootstrap.servers": cfg.bootstrap_servers, **cfg.kafka, **login(cfg, ADMIN)}
    upsert_scram_users(admin, passwords, timeout_s)
    return len(passwords)


@contextlib.contextmanager
def secured_broker(
    cfg: PipelineConfig, kind: str, folder: Path | None = None, **kwargs: Any
) -> Iterator[PipelineConfig]:
    """A local broker secured for the block (:mod:`consumers.brokers.security`): the principals' passwords
    in ``<folder>/credentials`` (a temporary folder without one), the ACL table applied; yields ``cfg``
    against it (:func:`secured`). ``kwargs`` go to the broker."""
    from consumers.brokers.launch import local_broker
    from consumers.brokers.security import BrokerSecurity

    if kind != "kafka":
        raise ValueError(f"--secure needs --broker kafka: {kind} has no authentication or ACLs")
    with contextlib.ExitStack() as stack:
        base = folder or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fpocmh-secure-")))
        security = BrokerSecurity(base / "credentials", cfg.security.principals, ADMIN)
        bootstrap = stack.enter_context(local_broker(kind, security=security, **kwargs))
        count = security.apply_acls(acl_bindings(cfg))
        log.info(
            "secured %s broker on %s: %d principals, %d ACLs", kind, bootstrap, len(cfg.security.principals), count
        )
        yield secured(cfg, bootstrap, security.client_properties(), security.credentials_dir)
