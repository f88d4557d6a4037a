"""Deterministic fault points for the fault-injection tests: a role kills itself at a named point.

``FPOCMH_FAULT=<point>:<n>`` makes the process SIGKILL itself the ``n``-th time it reaches ``point``
(for example ``encoder.before_commit:3``: with its third batch's codes produced, before the batch is
committed). Unset, a point costs one dictionary lookup. Never set it outside tests.
"""

from __future__ import annotations

import os
import signal

FAULT_ENV = "FPOCMH_FAULT"
_spec = os.environ.get(FAULT_ENV, "")
_point, _, _count = _spec.partition(":")
_left = int(_count) if _spec and _count.isdigit() else 0


def point(name: str) -> None:
    """Die here (SIGKILL, nothing flushed or committed) if this is the configured fault's n-th visit."""
    global _left
    if _left and name == _point:
        _left -= 1
        if _left == 0:
            os.kill(os.getpid(), signal.SIGKILL)
