"""A local Apache Kafka cluster: ``brokers`` KRaft nodes, each a combined broker and controller.

Each node is an :class:`~consumers.brokers.apache_kafka.ApacheKafkaBroker` on its own pair of free
loopback ports (client and controller listener), with its own log directory, all formatted with one
cluster id; the controllers form a static quorum (``controller.quorum.voters`` lists every node), so a
majority of the nodes must be up for the cluster to change its metadata (elect a leader, shrink an ISR).
The internal topics (group offsets, transaction state) get the replication the pipeline's topics get, so
losing a node loses neither a commit nor a transaction. Nodes start together (none is ready before a
majority is up), and each can be killed and restarted on its ports and log directory for fault tests.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from consumers.brokers.apache_kafka import ApacheKafkaBroker, new_cluster_id
from consumers.brokers.process import BrokerError, free_port

# Three JVMs and the roles on a 2-core, 24 GB machine (and CI): each node's heap is bounded well below the
# single broker's 512 MB; docs/cluster.md gives the resident sizes measured under the fault tests and bench.
NODE_HEAP = "-Xmx384m"


def replication_properties(replication_factor: int, min_insync_replicas: int) -> dict[str, str]:
    """What a node needs so its internal topics and any topic created without settings are replicated like
    the pipeline's: a lost node must not take the group offsets or the transaction state with it."""
    factor, in_sync = str(replication_factor), str(min_insync_replicas)
    return {
        "default.replication.factor": factor,
        "min.insync.replicas": in_sync,
        "offsets.topic.replication.factor": factor,
        "transaction.state.log.replication.factor": factor,
        "transaction.state.log.min.isr": in_sync,
        "share.coordinator.state.topic.replication.factor": factor,
        "share.coordinator.state.topic.min.isr": in_sync,
        # Kafka's default, said here because the guarantees rest on it: a replica that was not in sync never
        # becomes leader, so an acknowledged write is never dropped for availability.
        "unclean.leader.election.enable": "false",
    }


class KafkaCluster:
    """``with KafkaCluster(3) as bootstrap: ...``; ``kill(node)`` then ``restart(node)`` for fault tests.

    ``bootstrap`` lists every node. ``log_path`` names the nodes' logs (``kafka.log`` -> ``kafka-1.log`` ...).
    """

    kind = "kafka"

    def __init__(
        self,
        brokers: int = 3,
        host: str = "127.0.0.1",
        port: int | None = None,
        log_path: Path | None = None,
        log_dir: Path | None = None,
        properties: Mapping[str, Any] | None = None,
        home: Path | None = None,
        replication_factor: int = 3,
        min_insync_replicas: int = 2,
        heap: str = NODE_HEAP,
    ) -> None:
        if replication_factor > brokers:
            raise ValueError(f"replication factor {replication_factor} on {brokers} broker(s)")
        ids = range(1, brokers + 1)
        # The first node may take a given port; the others, and every controller listener, take free ones.
        ports = {i: port if i == 1 and port else free_port(host) for i in ids}
        controllers = {i: free_port(host) for i in ids}
        voters = ",".join(f"{i}@{host}:{controllers[i]}" for i in ids)
        props = {**replication_properties(replication_factor, min_insync_replicas), **(properties or {})}
        cluster_id = new_cluster_id()
        self.nodes = {
            i: ApacheKafkaBroker(
                host,
                ports[i],
                None if log_path is None else log_path.with_name(f"{log_path.stem}-{i}{log_path.suffix}"),
                # None: a temporary one per node, made at its first start and removed on exit.
                None if log_dir is None else Path(log_dir) / f"node-{i}",
                props,
                home,
                node_id=i,
                controller_port=controllers[i],
                voters=voters,
                cluster_id=cluster_id,
                heap=heap,
            )
            for i in ids
        }

    @property
    def log_path(self) -> Path | None:
        """The log of the first node that died, else the first node's."""
        dead = [node for node in self.nodes.values() if node.exit_code() is not None]
        return (dead or list(self.nodes.values()))[0].log_path

    @property
    def bootstrap(self) -> str:
        return ",".join(node.bootstrap for node in self.nodes.values())

    def _each(self, call: Callable[[ApacheKafkaBroker], Any], nodes: list[ApacheKafkaBroker]) -> None:
        """``call`` on the nodes at once (a node waits for the others: no quorum before a majority is up)."""
        errors: list[BaseException] = []

        def attempt(node: ApacheKafkaBroker) -> None:
            try:
                call(node)
            except BaseException as exc:  # handed to the calling thread
                errors.append(exc)

        threads = [threading.Thread(target=attempt, args=(node,), daemon=True) for node in nodes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]

    def start(self, timeout: float | None = None) -> str:
        """Every node, then until the metadata lists them all."""
        try:
            self._each(lambda node: node.start(timeout), list(self.nodes.values()))
            self.wait_for_brokers(len(self.nodes), timeout or ApacheKafkaBroker.start_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self.bootstrap

    def brokers_in_metadata(self, timeout: float = 5.0) -> set[int]:
        """The node ids the cluster's metadata lists (a killed node drops out once the controller fences it)."""
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0})
        try:
            return set(admin.list_topics(timeout=timeout).brokers)
        except KafkaException:
            return set()

    def wait_for_brokers(self, count: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.brokers_in_metadata()) != count:
            if time.monotonic() > deadline:
                raise BrokerError(f"the cluster's metadata did not list {count} brokers within {timeout:.0f} s")
            time.sleep(0.2)

    def leader_of(self, topic: str, partition: int = 0) -> int:
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0})
        return admin.list_topics(topic, timeout=10).topics[topic].partitions[partition].leader

    def kill(self, node_id: int) -> None:
        """SIGKILL one node, as a crash would."""
        self.nodes[node_id].kill()

    def restart(self, node_id: int, timeout: float | None = None) -> str:
        """Start one node again on its ports and log directory (it needs a majority of nodes up to be ready)."""
        return self.nodes[node_id].restart(timeout)

    def exit_code(self) -> int | None:
        """None while every node runs; the exit code of the first one that died otherwise."""
        return next((code for node in self.nodes.values() if (code := node.exit_code()) is not None), None)

    def stop(self) -> None:
        # All at once: a node stopping alone waits for its controlled shutdown, which needs a quorum.
        self._each(lambda node: node.stop(), list(self.nodes.values()))

    def __enter__(self) -> str:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        for node in self.nodes.values():
            node.__exit__(exc_type, exc, tb)
