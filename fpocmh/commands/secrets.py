"""``fpocmh secrets``: draw the secrets of the secured compose deployment (docker-compose.secure.yml)."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = (
    "write a CA, the broker's certificate, a password per role's principal and the broker's logins into a "
    "folder, for `docker compose -f docker-compose.yml -f docker-compose.secure.yml up`"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="PATH", help="deployment YAML on top of config/pipeline.yaml")
    parser.add_argument("--dir", type=Path, default=Path("deploy/secrets"), help="folder the secrets go to")
    parser.add_argument("--host", default="kafka", help="the broker's host name its certificate is for")
    parser.add_argument("--days", type=int, default=365, help="how long the certificates are valid")


def run(args: argparse.Namespace) -> int:
    from consumers import settings
    from consumers.brokers.secrets_folder import write_secrets
    from consumers.credentials import ADMIN

    cfg = settings.load(args.config)
    try:
        written = write_secrets(args.dir, cfg.security.principals, ADMIN, args.host, args.days)
    except FileExistsError as exc:
        raise SystemExit(f"fpocmh secrets: {exc}") from None
    for path in written:
        print(f"wrote {path}")
    print(
        "next: docker compose -f docker-compose.yml -f docker-compose.secure.yml up -d --build "
        "(topics-init creates the SCRAM users and the ACLs)"
    )
    return 0
