"""How a code is cut into the substrings that multi-index hashing keys its tables on.

Norouzi, Punjani and Fleet pick m ~ bits / log2(n) substrings so that a table has about one code per
bucket. Here a substring is also capped at ceil(log2 n) bits: a table's bucket array has 2^width
entries, and wider substrings would cost more memory per code than the row indices themselves.

Learned codes are skewed (a bit that is 1 for 90 % of the codes carries half a bit of information)
and their bits are correlated; contiguous substrings then put correlated bits in one key and leave a
few buckets holding most codes. :func:`balanced_groups` spreads entropy and correlation over the
substrings instead, from the codes at build time; the benchmark measures what it buys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

MAX_WIDTH = 32  # keys are uint32
SAMPLE_ROWS = 1 << 17  # enough codes to estimate bit means and correlations


@dataclass(frozen=True)
class SubstringPlan:
    """Substring ``j`` is the bits ``groups[j]`` of the code (positions as ``np.unpackbits`` numbers them),
    ``groups[j][t]`` giving bit ``t`` of its key."""

    bits: int
    groups: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        flat = sorted(b for g in self.groups for b in g)
        if flat != list(range(self.bits)):
            raise ValueError(f"substrings must cover each of the {self.bits} bits once")
        if any(not 1 <= len(g) <= MAX_WIDTH for g in self.groups):
            raise ValueError(f"substring widths must be 1..{MAX_WIDTH}")

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(len(g) for g in self.groups)

    @property
    def m(self) -> int:
        return len(self.groups)

    @cached_property
    def byte_keys(self) -> np.ndarray:
        """(bits/8, 256, m) uint32: what byte p of a code holding value v puts into each key. A key is the OR
        of its bytes' parts: one lookup per byte instead of unpacking the code's bits, which a query pays
        for every segment it searches."""
        nbytes = self.bits // 8
        values = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1)  # (256, 8), MSB first
        out = np.zeros((nbytes, 256, self.m), np.uint32)
        for j, group in enumerate(self.groups):
            for t, bit in enumerate(group):
                out[bit // 8, :, j] |= values[:, bit % 8].astype(np.uint32) << np.uint32(t)
        return out

    def keys(self, codes: np.ndarray) -> np.ndarray:
        """(n, m) uint32 substring keys of packed codes (n, bits/8)."""
        codes = np.atleast_2d(codes)
        parts = self.byte_keys
        out = parts[0, codes[:, 0]]
        for p in range(1, codes.shape[1]):
            out |= parts[p, codes[:, p]]
        return out


def substring_count(bits: int, n: int) -> int:
    """m ~ bits / log2(n), with no substring wider than ceil(log2 n) bits (nor 32)."""
    width = min(MAX_WIDTH, max(1, math.ceil(math.log2(max(n, 2)))))
    return max(1, min(bits, math.ceil(bits / width)))


def even_widths(bits: int, m: int) -> list[int]:
    return [bits // m + (j < bits % m) for j in range(m)]


def contiguous_groups(bits: int, m: int) -> SubstringPlan:
    groups, start = [], 0
    for w in even_widths(bits, m):
        groups.append(tuple(range(start, start + w)))
        start += w
    return SubstringPlan(bits, tuple(groups))


def balanced_groups(codes: np.ndarray, m: int, seed: int = 0) -> SubstringPlan:
    """Substrings of even widths whose bits are as little correlated and as evenly informative as a
    greedy pass makes them: the most informative bit first, each into the substring (with room left)
    whose bits it is least correlated with, ties to the substring holding the least entropy."""
    bits = codes.shape[1] * 8
    rows = codes
    if codes.shape[0] > SAMPLE_ROWS:
        rows = codes[np.random.default_rng(seed).choice(codes.shape[0], SAMPLE_ROWS, replace=False)]
    x = np.unpackbits(rows, axis=1).astype(np.float32)
    p = x.mean(axis=0).clip(1e-6, 1 - 1e-6)
    entropy = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    std = x.std(axis=0)
    live = std > 0
    corr = np.zeros((bits, bits), np.float32)
    if live.sum() > 1:
        corr[np.ix_(live, live)] = np.abs(np.corrcoef(x[:, live], rowvar=False))
    room = even_widths(bits, m)
    groups: list[list[int]] = [[] for _ in range(m)]
    held = np.zeros(m)
    for b in np.argsort(-entropy, kind="stable"):
        best = min(
            (j for j in range(m) if len(groups[j]) < room[j]),
            key=lambda j: (float(corr[b, groups[j]].sum()) if groups[j] else 0.0, held[j], j),
        )
        groups[best].append(int(b))
        held[best] += entropy[b]
    return SubstringPlan(bits, tuple(tuple(sorted(g)) for g in groups))
