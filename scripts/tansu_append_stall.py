"""Reproduce the embedded tansu broker's fetch stall under concurrent appends to one partition.

Each round, ``--producers`` producers append one record each at the same moment (a barrier), as the
shards of a query tier answer one request, and a consumer following the topic waits for all of them.
``--layout shared`` appends to one partition (how the query tier answered before each shard got a
reply partition of its own), ``own`` gives every producer its own partition. A round whose records do
not all arrive within ``--patience`` seconds is reported as a stall, with the consumer's position, the
broker's high watermarks and what a fresh consumer finds from a little before that position::

    python scripts/tansu_append_stall.py                      # 4 producers, one partition
    python scripts/tansu_append_stall.py --layout own         # a partition each
    python scripts/tansu_append_stall.py --broker kafka       # the same on a local Apache Kafka

Exit status 1 when it stalled, 0 when every round arrived.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from consumers.brokers.launch import BROKER_KINDS, local_broker  # noqa: E402

TOPIC = "append-stall"


def read_from(bootstrap: str, partitions: list[TopicPartition], seconds: float) -> list[tuple[int, int, bytes]]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "fresh", "fetch.wait.max.ms": 2})
    consumer.assign(partitions)
    out, end = [], time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            msg = consumer.poll(0.05)
            if msg is not None and msg.error() is None:
                out.append((msg.partition(), msg.offset(), msg.value()))
    finally:
        consumer.close()
    return out


def run(bootstrap: str, producers: int, rounds: int, own: bool, patience: float) -> int:
    n_partitions = producers if own else 1
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(TOPIC, n_partitions, 1)])[TOPIC].result()
    senders = [Producer({"bootstrap.servers": bootstrap, "linger.ms": 0}) for _ in range(producers)]
    follower = Consumer({"bootstrap.servers": bootstrap, "group.id": "follower", "fetch.wait.max.ms": 2})
    follower.assign([TopicPartition(TOPIC, p, 0) for p in range(n_partitions)])
    barrier = threading.Barrier(producers + 1)

    def append(i: int) -> None:
        for r in range(rounds):
            barrier.wait()
            senders[i].produce(TOPIC, f"{r}:{i}".encode(), partition=i if own else 0)
            senders[i].flush()

    for i in range(producers):
        threading.Thread(target=append, args=(i,), daemon=True).start()
    got: set[bytes] = set()
    try:
        for r in range(rounds):
            barrier.wait()
            want = {f"{r}:{i}".encode() for i in range(producers)}
            deadline = time.monotonic() + patience
            while not want <= got:
                msg = follower.poll(0.05)
                if msg is not None and msg.error() is None:
                    got.add(msg.value())
                if time.monotonic() > deadline and not want <= got:
                    positions = follower.position([TopicPartition(TOPIC, p) for p in range(n_partitions)])
                    ends = [follower.get_watermark_offsets(tp, timeout=10)[1] for tp in positions]
                    print(f"stalled in round {r} of {rounds}: missing {sorted(want - got)}")
                    print(f"  follower at {[tp.offset for tp in positions]}, high watermarks {ends}")
                    back = [TopicPartition(TOPIC, tp.partition, max(0, tp.offset - 8)) for tp in positions]
                    print(f"  a fresh consumer from 8 records back reads {read_from(bootstrap, back, 3.0)}")
                    return 1
            if (r + 1) % 500 == 0:
                print(f"{r + 1} rounds", flush=True)
        print(f"no stall: {rounds} rounds, {len(got)} records")
        return 0
    finally:
        follower.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--producers", type=int, default=4, help="producers appending each round (default 4)")
    parser.add_argument("--rounds", type=int, default=3000, help="rounds (default 3000)")
    parser.add_argument("--layout", choices=("shared", "own"), default="shared", help="one partition, or one each")
    parser.add_argument("--patience", type=float, default=5.0, help="seconds a round may take (default 5)")
    parser.add_argument("--broker", choices=BROKER_KINDS, default="tansu", help="local broker to start (default tansu)")
    args = parser.parse_args()
    with local_broker(args.broker) as bootstrap:
        return run(bootstrap, args.producers, args.rounds, args.layout == "own", args.patience)


if __name__ == "__main__":
    raise SystemExit(main())
