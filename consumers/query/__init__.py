"""The query tier: shards of the code store answering retrieval requests, and the client that merges them.

``role`` is the shard process (keeps its store current from ``code_log``, answers requests at the asked
consistency); ``store`` holds the codes (upserts by item id, masks, exact search ordered by (distance,
item id)); ``shards`` says which partitions a shard owns and merges answers; ``snapshots`` saves and
restores a store with the offsets it reflects; ``client`` sends requests and gathers every shard's answer.
"""
