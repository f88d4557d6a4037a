"""Shards of the query tier: which codes partitions a shard owns, and how shard answers merge.

Shard ``s`` of ``S`` owns the codes partitions ``{p : p mod S = s}``, read with ``assign()`` (no
group: no state moves in a rebalance). Every shard sees every request: it consumes the queries topic
in a consumer group of its own, which its replicas share. Each answers its local top-k tagged with
``(s, S)`` and the offsets its store reflects, on a reply partition of its own; the client merges the
``S`` answers by (distance, item id), which equals one store's answer on the union of the codes, ties
included.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from fpocmh_core import schemas
from fpocmh_core.hamming import sort_by_distance_then_id


@dataclass(frozen=True)
class ShardSpec:
    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index}/{self.count}: need 0 <= s < S")

    @classmethod
    def parse(cls, text: str) -> ShardSpec:
        """``"s/S"``, e.g. ``"0/2"``."""
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if match is None:
            raise ValueError(f"shard {text!r}: expected s/S, e.g. 0/2")
        return cls(int(match[1]), int(match[2]))

    @property
    def whole(self) -> bool:
        return self.count == 1

    def owns(self, partitions: Sequence[int]) -> list[int]:
        return [p for p in partitions if p % self.count == self.index]

    def group(self, base: str) -> str:
        """The shard's consumer group on the queries topic: its replicas share it."""
        return base if self.whole else f"{base}-s{self.index}of{self.count}"

    def reply_partition(self, asked: int, partitions: int) -> int:
        """Where this shard answers a request that asked for ``asked`` (-1: by key): shard s on
        ``asked + s``, so the S answers to one request land on different partitions while there are
        enough of them (tansu stalls readers of a partition that takes concurrent appends)."""
        return asked if asked < 0 else (asked + self.index) % partitions

    @property
    def tag(self) -> str:
        return "all" if self.whole else f"{self.index}/{self.count}"

    @property
    def result_shard(self) -> int | None:
        return None if self.whole else self.index


def merge_topk(answers: Sequence[tuple[np.ndarray, np.ndarray]], k: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(distances, ids) of ``n`` queries from several stores' (distances, ids), each (n, k_s) in
    (distance, id) order: the first ``k`` of their union in the same order. The top-k of a union is
    within the union of the parts' top-k lists, so this is exact."""
    parts = [(d, i) for d, i in answers if d.shape[1]]
    if not parts:
        return np.zeros((n, 0), np.int32), np.zeros((n, 0), np.int64)
    dist = np.concatenate([d for d, _i in parts], axis=1).astype(np.int32)
    ids = np.concatenate([i for _d, i in parts], axis=1).astype(np.int64)
    return sort_by_distance_then_id(dist, ids, min(k, dist.shape[1]))


class ShardAnswers:
    """The answers to one request as they arrive; complete once every shard of ``S`` has answered (an
    untagged answer covers the whole store alone)."""

    def __init__(self) -> None:
        self.by_shard: dict[int | None, schemas.QueryResult] = {}

    def add(self, result: schemas.QueryResult) -> None:
        self.by_shard[result.shard] = result

    @property
    def expected(self) -> int:
        return max(r.shard_count for r in self.by_shard.values()) if self.by_shard else 1

    @property
    def complete(self) -> bool:
        if None in self.by_shard:
            return True
        return bool(self.by_shard) and len(self.by_shard) >= self.expected

    @property
    def missing(self) -> list[int]:
        if self.complete:
            return []
        return [s for s in range(self.expected) if s not in self.by_shard]

    @property
    def model_versions(self) -> set[int]:
        return {r.model_version for r in self.by_shard.values() if r.status == "ok"}

    def merged(self, k: int) -> schemas.QueryResult:
        """One result: the merged top-``k`` when every shard answered ok; otherwise the worst status
        (bad_request, behind, not_ready, then partial for missing shards) with every shard's reason."""
        results = [self.by_shard[s] for s in sorted(self.by_shard, key=lambda s: -1 if s is None else s)]
        first = results[0]
        if None in self.by_shard:
            return self.by_shard[None]
        n = max(r.ids.shape[0] for r in results)
        errors = [f"shard {r.shard}/{r.shard_count}: {r.error or r.status}" for r in results if r.status != "ok"]
        status = next(
            (s for s in ("bad_request", "behind", "not_ready") if any(r.status == s for r in results)),
            "partial" if self.missing else "ok",
        )
        if self.missing:
            errors.append(f"no answer from shard(s) {', '.join(map(str, self.missing))} of {self.expected}")
        ok = [r for r in results if r.status == "ok"]
        dist, ids = merge_topk([(r.distances, r.ids) for r in ok], k, n)
        offsets = tuple(sorted(o for r in results for o in r.offsets))
        counts = tuple(int(sum(r.store_codes[m] for r in results)) for m in (0, 1))
        slowest = max(results, key=lambda r: r.search_seconds)
        return replace(
            first,
            status=status,
            ids=ids,
            distances=dist,
            model_version=max(r.model_version for r in results),
            store_codes=counts,
            search_seconds=slowest.search_seconds,
            hash_seconds=slowest.hash_seconds,
            error="; ".join(errors),
            shard=None,
            shard_count=self.expected,
            offsets=offsets,
        )
