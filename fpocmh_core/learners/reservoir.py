"""A uniform sample of the items an online learner has seen, with the codes they were stored with.

Per modality, a fixed number of slots filled by reservoir sampling (Vitter's algorithm R): after ``n``
items every one of them is in the sample with the same probability. Each slot holds the item's id, its
code in {-1, +1} as the learner's model of its arrival gave it (what the encoder stored, up to the version
lag between encoder and learner), its categories and, when asked for, its features (float16), so that the
codes it was stored with can be rehearsed. When the learner later writes the item's code itself, it can
put that code in the slot (:meth:`replace_code`): from then on it is the code the database holds. Offline
items are offered first, with the codes the offline model stored, so the sample starts as the offline part
and shifts towards the stream as it grows.

Every random choice is a function of (seed, modality, count), so the sample needs no generator state:
exporting the counts is enough for an exact resume, and feeding items one at a time or in micro-batches
gives the same sample.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fpocmh_core.records import Modality

MODALITIES = (Modality.IMAGE, Modality.TEXT)
_MASK = (1 << 64) - 1


def _mix(*values: int) -> int:
    """splitmix64's finaliser chained over the values: a cheap, well-spread 64-bit hash of small integers."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _MASK)) * 0xBF58476D1CE4E5B9 & _MASK
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & _MASK
        h ^= h >> 31
    return h


def _mix_array(base: int, n: int) -> np.ndarray:
    """``n`` further hashes of ``base`` (the same finaliser on base + 1 .. base + n), vectorised: a
    generator-free stream of uniform 64-bit integers, much cheaper than seeding a numpy Generator."""
    with np.errstate(over="ignore"):
        h = np.uint64(base) + np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return h ^ (h >> np.uint64(31))


def _signs(code: np.ndarray) -> np.ndarray:
    """A code (relaxed or +-1) as the +-1 a slot stores."""
    return np.where(np.asarray(code) > 0, 1, -1)


class CodeReservoir:
    """Per modality: up to ``capacity`` (item id, stored code, categories) slots, a uniform sample of all items
    offered."""

    def __init__(
        self,
        capacity: int,
        bits: int,
        n_categories: int,
        seed: int,
        dims: Mapping[Modality, int] | None = None,
        codes: Mapping[Modality, np.ndarray] | None = None,
        categories: Mapping[Modality, np.ndarray] | None = None,
        features: Mapping[Modality, np.ndarray] | None = None,
        seen: Mapping[Modality, int] | None = None,
        ids: Mapping[Modality, np.ndarray] | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"reservoir capacity must be >= 1, got {capacity}")
        self.capacity, self.seed = capacity, seed
        self.codes = {m: np.zeros((capacity, bits), np.int8) for m in MODALITIES}
        # -1: no id known (an empty slot, or a reservoir saved before slots kept ids).
        self.ids = {m: np.full(capacity, -1, np.int64) for m in MODALITIES}
        self.categories = {m: np.zeros((capacity, n_categories), bool) for m in MODALITIES}
        self.features = {m: np.zeros((capacity, dims[m]), np.float16) for m in MODALITIES} if dims else {}
        self.seen = {m: 0 for m in MODALITIES}
        for m in MODALITIES:
            if codes is not None and categories is not None:
                self.codes[m][: len(codes[m])] = codes[m]
                self.categories[m][: len(categories[m])] = categories[m]
            if features:
                self.features[m][: len(features[m])] = features[m]
            if ids is not None:
                self.ids[m][: len(ids[m])] = ids[m]
            if seen is not None:
                self.seen[m] = int(seen[m])

    def size(self, modality: Modality) -> int:
        return min(self.seen[modality], self.capacity)

    def add(
        self,
        modality: Modality,
        item_id: int,
        code: np.ndarray,
        categories: Sequence[int],
        feature: np.ndarray | None = None,
    ) -> int | None:
        """Offer one item: kept with probability capacity / items offered so far, in a slot chosen at random.
        ``feature`` is required when the reservoir keeps features and ignored otherwise. Returns the slot
        the item took, or None."""
        n = self.seen[modality]
        slot = n if n < self.capacity else _mix(self.seed, MODALITIES.index(modality), n) % (n + 1)
        self.seen[modality] = n + 1
        if slot < self.capacity:
            self.ids[modality][slot] = item_id
            self.codes[modality][slot] = _signs(code)
            self.categories[modality][slot] = False
            self.categories[modality][slot, list(categories)] = True
            if self.features:
                self.features[modality][slot] = feature
            return slot
        return None

    def replace_code(self, modality: Modality, slot: int, item_id: int, code: np.ndarray) -> bool:
        """Put a newer stored code of ``item_id`` into its slot; False (and nothing changed) when a later
        item has taken the slot since."""
        if self.ids[modality][slot] != item_id:
            return False
        self.codes[modality][slot] = _signs(code)
        return True

    def sample(self, modality: Modality, key: int, n: int, categories: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """``n`` slots drawn with replacement, as a function of ``key``: their codes (float32) and whether
        each shares a category with ``categories`` (float32 0/1). While the sample is empty, ``n`` zero
        codes, unrelated: a zero code adds a constant to the pairwise loss and nothing to its gradient."""
        size = self.size(modality)
        if size == 0:
            return np.zeros((n, self.codes[modality].shape[1]), np.float32), np.zeros(n, np.float32)
        rows = (_mix_array(_mix(self.seed, MODALITIES.index(modality), key), n) % np.uint64(size)).astype(np.intp)
        related = self.categories[modality][rows][:, list(categories)].any(axis=1)
        return self.codes[modality][rows].astype(np.float32), related.astype(np.float32)

    def rehearsal(self, modality: Modality, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Features (float32) and stored codes (float32 +-1) of the given slots (< :meth:`size`)."""
        return self.features[modality][rows].astype(np.float32), self.codes[modality][rows].astype(np.float32)

    def tensors(self, prefix: str) -> dict[str, np.ndarray]:
        out = {}
        for m in MODALITIES:
            if self.features:
                out[f"{prefix}.features.{m.short}"] = self.features[m]
            out[f"{prefix}.code.{m.short}"] = self.codes[m]
            out[f"{prefix}.id.{m.short}"] = self.ids[m]
            out[f"{prefix}.categories.{m.short}"] = self.categories[m].astype(np.uint8)
            out[f"{prefix}.seen.{m.short}"] = np.asarray([self.seen[m]], dtype=np.int64)
        return out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, np.ndarray], seed: int) -> CodeReservoir:
        """Inverse of :meth:`tensors` (the prefix already stripped)."""
        codes = {m: np.asarray(tensors[f"code.{m.short}"]) for m in MODALITIES}
        cats = {m: np.asarray(tensors[f"categories.{m.short}"]).astype(bool) for m in MODALITIES}
        seen = {m: int(np.asarray(tensors[f"seen.{m.short}"])[0]) for m in MODALITIES}
        feats = {m: np.asarray(tensors[f"features.{m.short}"]) for m in MODALITIES if f"features.{m.short}" in tensors}
        ids = {m: np.asarray(tensors[f"id.{m.short}"]) for m in MODALITIES if f"id.{m.short}" in tensors} or None
        dims = {m: f.shape[1] for m, f in feats.items()} or None
        capacity, bits = codes[Modality.IMAGE].shape
        return cls(capacity, bits, cats[Modality.IMAGE].shape[1], seed, dims, codes, cats, feats, seen, ids)
