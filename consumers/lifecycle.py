"""A role process's life: SIGTERM sets a flag, and the heap built at start-up is frozen."""

from __future__ import annotations

import gc
import logging
import signal
import threading

log = logging.getLogger(__name__)


def install_signal_handlers(stop: threading.Event) -> None:
    """SIGTERM and the first SIGINT set ``stop``; a second SIGINT raises KeyboardInterrupt as usual."""

    def on_signal(signum: int, _frame: object) -> None:
        log.info("%s received: stopping cleanly (a second Ctrl-C interrupts)", signal.Signals(signum).name)
        stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def freeze_startup_heap() -> int:
    """Put every object alive now out of the cyclic collector's reach; how many there were.

    A role process holds ~200,000 tracked objects once torch, numpy and the Kafka client are imported,
    and each full collection walked them all (80 ms here). Under load, with a batch's messages alive
    across collections, full collections came often enough to take a tenth of the encoder's CPU
    (perf, ``fpocmh bench pipeline``). Frozen objects are still freed by reference counting; only a
    cycle among them would never be collected, and what is alive at start lives as long as the role.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
