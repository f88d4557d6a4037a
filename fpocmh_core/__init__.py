"""Kafka-free core of fpocmh: datasets, stream protocols, hash networks, learners and evaluation.

Nothing in this package imports confluent_kafka; the pipeline's consumers are thin adapters around it.
"""
