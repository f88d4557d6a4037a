"""Kafka consumer roles (encoder, learner, query): thin adapters around ``fpocmh_core``."""
