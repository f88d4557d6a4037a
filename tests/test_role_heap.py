"""Freezing the start-up heap, as every role command does (`role_setup`), leaves later garbage cycles collectable."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_a_frozen_start_up_heap_still_collects_new_garbage_cycles():
    # In a child process: freezing is for a role's whole life, not for the test session's.
    script = textwrap.dedent(
        """
        import gc, weakref
        from consumers.lifecycle import freeze_startup_heap

        frozen = freeze_startup_heap()
        class Node:
            pass
        node = Node()
        node.itself = node
        alive = weakref.ref(node)
        del node
        gc.collect()
        print(frozen, gc.get_freeze_count(), alive() is None)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    frozen, still_frozen, collected = int(out[0]), int(out[1]), out[2] == "True"
    assert frozen > 10_000  # the imports alone (numpy, the Kafka client) leave tens of thousands
    assert still_frozen == frozen
    assert collected
