"""Benchmarks of the pipeline through a broker, apart from the roles they measure.

``pipeline`` (``fpocmh bench pipeline``: ingest and query latency against bounds taken in the same run),
``query`` (``fpocmh bench query``: the sharded query tier) with ``scan_floor`` (the same probes on bare
scanning processes), and ``workload`` (the messages, models and counters they share). Each writes its
JSON with the command, commit and machine.
"""
