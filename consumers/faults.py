"""Deterministic fault points for the fault-injection tests: a role kills itself at a named point.

``FPOCMH_FAULT=<point>:<n>`` makes the process SIGKILL itself the ``n``-th time it reaches ``point``
(for example ``encoder.before_commit:3``: with its third batch's codes produced, before the batch is
committed). Unset, a point costs one comparison. Never set it outside tests.
"""

from __future__ import annotations

import os
import signal

FAULT_ENV = "FPOCMH_FAULT"
_armed: list[tuple[str, int]] = []


def arm(spec: str) -> None:
    """``"<point>:<n>"``: die at the n-th visit of ``point`` (empty: disarm)."""
    name, _, count = spec.partition(":")
    _armed[:] = [(name, int(count))] if name and count.isdigit() and int(count) > 0 else []


def point(name: str) -> None:
    """Die here (SIGKILL: nothing flushed or committed) if this is the armed fault's n-th visit."""
    if _armed and _armed[0][0] == name:
        left = _armed[0][1] - 1
        if left == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        _armed[0] = (name, left)


arm(os.environ.get(FAULT_ENV, ""))
