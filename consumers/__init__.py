"""The pipeline's Kafka side: thin adapters around ``fpocmh_core``.

Top level: the runtime every role runs on (``runtime``: the poll loop; ``handlers``, ``offsets``,
``topic_reader``, ``lifecycle``; ``kafka``: clients and topics; ``settings``: the frozen config; ``models``:
model versions on the wire; ``metrics``, ``health``, ``faults``, ``processes``). Packages: one per role
(``encoder``, ``learner``, ``query``), ``brokers`` (local brokers to run against) and ``bench`` (the
benchmarks, kept apart from the roles they measure). Lower layers never import higher ones: a role imports
the runtime, the runtime never imports a role, and nothing imports ``bench``.
"""
