"""The secrets of a secured deployment (``docker-compose.secure.yml``), written once by ``fpocmh secrets``.

The compose file mounts each file as a Docker secret, so a container sees only its own:

- ``kafka_ca.pem``: the CA every client trusts (``ssl.ca.location``); ``kafka.pem``: the broker's key and
  certificate for the compose host name (a PEM keystore);
- one password per principal of ``security.principals``, in a file named by the principal: mounted into
  that role's container at ``/run/secrets/<principal>``, where ``security.credentials_dir`` points;
- ``kafka.env``: the broker's environment with its PLAIN logins (the broker's own on the controller and
  internal listeners, and the admin principal's on the internal one, which creates the SCRAM users);
  compose reads it as the broker's ``env_file``, so no password is on a command line or in the YAML;
- ``kafka-internal.properties``: the broker's own login, for its health check.

Everything but the CA is readable by the owner only. The secured node's layout is the local launcher's
(:class:`~consumers.brokers.security.BrokerSecurity`), whose settings the tests run on a real broker.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from pathlib import Path

from consumers.brokers.security import BROKER_USER, make_tls, plain_jaas, plain_login, write_private

CA_FILE = "kafka_ca.pem"
KEYSTORE_FILE = "kafka.pem"
KAFKA_ENV = "kafka.env"
INTERNAL_PROPERTIES = "kafka-internal.properties"
# Where the compose file mounts the broker's secrets inside its container.
BROKER_SECRETS = "/run/secrets"


def write_secrets(
    folder: Path, principals: Mapping[str, str], admin_role: str, host: str = "kafka", days: int = 365
) -> list[Path]:
    """Every file of the folder (made if missing; existing secrets are an error, never overwritten)."""
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    names = [CA_FILE, KEYSTORE_FILE, KAFKA_ENV, INTERNAL_PROPERTIES, *principals.values()]
    existing = [n for n in names if (folder / n).exists()]
    if existing:
        raise FileExistsError(f"{folder} already holds {', '.join(existing)}: remove them to draw new secrets")
    ca, keystore = make_tls(folder, host, days, KEYSTORE_FILE)
    ca.rename(folder / CA_FILE)
    passwords = {user: secrets.token_urlsafe(24) for user in principals.values()}
    written = [folder / CA_FILE, keystore]
    for user, password in passwords.items():
        written.append(write_private(folder / user, password.encode()))
    broker = secrets.token_urlsafe(24)
    admin = principals[admin_role]
    env = {
        "KAFKA_LISTENER_NAME_INTERNAL_PLAIN_SASL_JAAS_CONFIG": plain_jaas(broker, {admin: passwords[admin]}),
        "KAFKA_LISTENER_NAME_CONTROLLER_PLAIN_SASL_JAAS_CONFIG": plain_jaas(broker),
        "KAFKA_SUPER_USERS": f"User:{BROKER_USER};User:{admin}",
    }
    written.append(write_private(folder / KAFKA_ENV, "".join(f"{k}={v}\n" for k, v in env.items()).encode()))
    internal = {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "PLAIN",
        "sasl.jaas.config": plain_login(BROKER_USER, broker),
        "ssl.truststore.type": "PEM",
        "ssl.truststore.location": f"{BROKER_SECRETS}/{CA_FILE}",
    }
    text = "".join(f"{k}={v}\n" for k, v in internal.items())
    written.append(write_private(folder / INTERNAL_PROPERTIES, text.encode()))
    return written
