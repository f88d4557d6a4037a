"""In-process benchmarks (no Kafka): offline, partial-modal stream (P1) and lifelong (P2)."""
