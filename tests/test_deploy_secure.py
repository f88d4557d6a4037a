"""docker-compose.secure.yml agrees with the secured node the tests run for real (no Docker needed): the
broker settings are the local launcher's, each container holds only its own secrets, and every secret is a
file ``fpocmh secrets`` writes."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import yaml

from consumers import credentials, settings
from consumers.brokers import secrets_folder
from consumers.brokers.security import BrokerSecurity
from fpocmh import cli

ROOT = Path(__file__).resolve().parents[1]
RESET = object()


class ComposeLoader(yaml.SafeLoader):
    """YAML with compose's ``!reset`` tag (drop the base file's value)."""


ComposeLoader.add_constructor("!reset", lambda loader, node: RESET)


def load(name: str) -> dict:
    return yaml.load((ROOT / name).read_text(), Loader=ComposeLoader)


def merged() -> dict:
    """The services of docker-compose.yml with the secured file on top, as compose merges maps."""
    base, over = load("docker-compose.yml"), load("docker-compose.secure.yml")
    services = {}
    for name, service in base["services"].items():
        service = dict(service)
        for key, value in over["services"].get(name, {}).items():
            if value is RESET:
                service.pop(key, None)
            elif isinstance(value, dict) and isinstance(service.get(key), dict):
                service[key] = {**service[key], **value}
            else:
                service[key] = value
        services[name] = service
    return {"services": services, "secrets": over["secrets"]}


def image_properties(env: dict[str, str]) -> dict[str, str]:
    """The apache/kafka image's reading of ``KAFKA_*`` variables: ``___`` is a dash, ``__`` an underscore and
    ``_`` a dot."""
    props = {}
    for key, value in env.items():
        if key.startswith("KAFKA_") and key not in ("KAFKA_NODE_ID",):
            name = key[len("KAFKA_") :].lower().replace("___", "-").replace("__", "\0").replace("_", ".")
            props[name.replace("\0", "_")] = str(value)
    return props


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    folder = tmp_path_factory.mktemp("secrets") / "secrets"
    cfg = settings.load(None, environ={})
    assert cli.main(["secrets", "--dir", str(folder)]) == 0
    return folder, cfg


@pytest.fixture(scope="module")
def broker_properties(drawn):
    """The secured broker's properties: the compose files' environment and the drawn kafka.env."""
    folder, _cfg = drawn
    env = dict(merged()["services"]["kafka"]["environment"])
    env |= dict(line.split("=", 1) for line in (folder / secrets_folder.KAFKA_ENV).read_text().splitlines())
    return image_properties(env)


def argv_of(service: dict) -> list[str]:
    """The fpocmh arguments a service runs (after the image's ``fpocmh`` entrypoint, or its own)."""
    return [*service.get("entrypoint", ["fpocmh"])[1:], *service["command"]]


def principal_of(service: dict, cfg) -> str:
    return cfg.security.principals[credentials.COMMAND_LOGINS.get(argv_of(service)[0], credentials.ADMIN)]


ROLE_SERVICES = ("encoder", "learner", "query-s0", "query-s1", "replay")


def test_each_role_holds_only_its_own_password_and_the_ca(drawn):
    _folder, cfg = drawn
    services = merged()["services"]
    for name in ROLE_SERVICES:
        service = services[name]
        assert set(service["secrets"]) == {secrets_folder.CA_FILE, principal_of(service, cfg)}, name
        args = cli.build_parser().parse_args(argv_of(service))
        assert args.config == "config/compose-secure.yaml", name
        assert service["environment"]["FPOCMH_KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9094", name


def test_the_roles_config_logs_in_over_tls_with_the_mounted_secrets():
    cfg = settings.load(ROOT / "config/compose-secure.yaml", environ={})
    assert cfg.security.broker_login and cfg.security.credentials_dir == "/run/secrets"
    assert cfg.kafka["security.protocol"] == "SASL_SSL" and cfg.kafka["sasl.mechanisms"] == "SCRAM-SHA-512"
    assert cfg.kafka["ssl.ca.location"] == f"/run/secrets/{secrets_folder.CA_FILE}"


def test_topics_init_provisions_as_the_admin_on_the_internal_listener(drawn, broker_properties):
    _folder, cfg = drawn
    init = merged()["services"]["topics-init"]
    assert init["command"][:2] == ["topics", "--provision"]
    assert set(init["secrets"]) == {secrets_folder.CA_FILE, *cfg.security.principals.values()}
    assert init["environment"]["FPOCMH_KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9091"
    internal = broker_properties["listener.name.internal.plain.sasl.jaas.config"]
    admin = cfg.security.principals[credentials.ADMIN]
    assert f'user_{admin}="' in internal, "the admin logs in with PLAIN on the internal listener"
    assert f"User:{admin}" in broker_properties["super.users"].split(";")


def test_the_secured_broker_runs_the_settings_the_local_secured_node_runs(broker_properties, tmp_path):
    local = BrokerSecurity(tmp_path / "c", {"admin": "fpocmh-admin"}).server_properties("127.0.0.1", 1, 2, tmp_path)
    topology = {"listeners", "advertised.listeners", "controller.quorum.voters"}
    # Locally the keystore is the secured listener's; in compose both TLS listeners share it.
    keystore = {"listener.name.secured.ssl.keystore.type", "listener.name.secured.ssl.keystore.location"}
    for key in set(local) - topology - keystore:
        assert key in broker_properties, key
    same = [k for k in local if "jaas" not in k and k not in topology | keystore | {"super.users"}]
    same.remove("listener.security.protocol.map")
    for key in same + ["listener.name.secured.scram-sha-512.sasl.jaas.config"]:
        assert broker_properties[key] == local[key], key
    assert broker_properties["ssl.keystore.type"] == "PEM"
    assert broker_properties["ssl.keystore.location"] == f"/run/secrets/{secrets_folder.KEYSTORE_FILE}"


def test_the_secured_broker_publishes_nothing_and_speaks_no_plaintext(broker_properties):
    kafka = merged()["services"]["kafka"]
    assert "ports" not in kafka, "no listener reachable from the host"
    protocols = dict(item.split(":") for item in broker_properties["listener.security.protocol.map"].split(","))
    assert "PLAINTEXT" not in protocols.values()
    assert protocols["SECURED"] == protocols["INTERNAL"] == "SASL_SSL"
    listeners = {item.split("://")[0] for item in broker_properties["listeners"].split(",")}
    assert listeners == set(protocols)
    assert broker_properties["allow.everyone.if.no.acl.found"] == "false"
    assert "--command-config" in kafka["healthcheck"]["test"][1], "the health check logs in too"


def test_every_mounted_secret_is_a_file_fpocmh_secrets_writes(drawn):
    folder, _cfg = drawn
    compose = merged()
    used = {s for service in compose["services"].values() for s in service.get("secrets", [])}
    assert used == set(compose["secrets"])
    for name, secret in compose["secrets"].items():
        assert secret["file"] == f"./deploy/secrets/{name}"
        assert (folder / name).is_file(), name
    assert "deploy/secrets/" in (ROOT / ".gitignore").read_text().splitlines(), "secrets never committed"


def test_fpocmh_secrets_writes_owner_only_files_and_never_overwrites(drawn, capsys):
    folder, cfg = drawn
    for path in folder.iterdir():
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == 0o600 or path.name == secrets_folder.CA_FILE, (path.name, oct(mode))
    passwords = {p: (folder / p).read_text() for p in cfg.security.principals.values()}
    assert len(set(passwords.values())) == len(passwords), "a password per principal"
    with pytest.raises(SystemExit, match="already holds"):
        cli.main(["secrets", "--dir", str(folder)])
    assert {p: (folder / p).read_text() for p in passwords} == passwords
