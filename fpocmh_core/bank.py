"""The multimodal dual-tier anchor bank of FPO-CMH (methods.md A4.3 and A6).

One row per category, row-aligned across the two modalities: tier 1 holds the category's feature
prototype in each modality's input space, tier 2 its relaxed-code prototype in each modality's code
space. A category that turns up online without a row waits in a buffer until both modalities have seen
``promote_after`` of its items, then it becomes a row. The bank built from the offline data (tier 1) is
kept unchanged for initial-anchor rehearsal.

Update rule: a running mean (each prototype is the mean of every item that carried the category, the
offline items included), not the official code's fixed-factor-1/2 moving average. With 1/2 the newest
item always weighs half, so a prototype is effectively the last two or three items: the offline
initialisation is gone after a handful of arrivals and the code-tier targets jump from item to item.
The running mean keeps tier 2 equal to the centroid of the category's *stored* database codes (each
item's relaxed code as the model of its arrival gave it), which is what queries are matched against.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fpocmh_core.records import Modality

MODALITIES = (Modality.IMAGE, Modality.TEXT)


def cosine(x: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """Cosine similarity of every row of ``x`` (or of one vector) to every anchor row."""
    x = np.asarray(x, dtype=np.float32)
    xn = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    an = anchors / np.maximum(np.linalg.norm(anchors, axis=-1, keepdims=True), 1e-12)
    return xn @ an.T


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@dataclass
class _Pending:
    """A novel category's buffered prototypes (running means) per modality, before promotion."""

    feat: dict[Modality, np.ndarray] = field(default_factory=dict)
    code: dict[Modality, np.ndarray] = field(default_factory=dict)
    count: dict[Modality, int] = field(default_factory=lambda: {m: 0 for m in MODALITIES})


class AnchorBank:
    """Dual-tier, row-aligned category anchors for both modalities, with a novel-category buffer."""

    def __init__(
        self,
        categories: np.ndarray,
        feat: Mapping[Modality, np.ndarray],
        code: Mapping[Modality, np.ndarray],
        count: Mapping[Modality, np.ndarray],
        initial_feat: Mapping[Modality, np.ndarray],
        rehearsal_targets: Mapping[Modality, np.ndarray],
        promote_after: int,
        pending: dict[int, _Pending] | None = None,
    ) -> None:
        self.categories = [int(c) for c in categories]
        self.row_of = {c: r for r, c in enumerate(self.categories)}
        self.feat = {m: np.array(feat[m], dtype=np.float32) for m in MODALITIES}
        self.code = {m: np.array(code[m], dtype=np.float32) for m in MODALITIES}
        self.count = {m: np.array(count[m], dtype=np.float64) for m in MODALITIES}
        self.initial_feat = {m: np.array(initial_feat[m], dtype=np.float32) for m in MODALITIES}
        self.rehearsal_targets = {m: np.array(rehearsal_targets[m], dtype=np.float32) for m in MODALITIES}
        self.promote_after = promote_after
        self.pending = pending or {}

    @classmethod
    def build(
        cls,
        feats: Mapping[Modality, np.ndarray],
        relaxed: Mapping[Modality, np.ndarray],
        members: Mapping[Modality, np.ndarray],
        promote_after: int,
    ) -> AnchorBank:
        """Rows for every category with at least one member in *both* modalities (A4.3).

        ``members[m]`` is an (items x vocabulary) 0/1 matrix; an item with several categories counts
        towards each. Rows are in category-id order. Rehearsal targets are set by the caller
        (:meth:`set_rehearsal_targets`), since they need the offline networks.
        """
        counts = {m: np.asarray(members[m], dtype=np.float64).sum(axis=0) for m in MODALITIES}
        cats = np.flatnonzero((counts[Modality.IMAGE] > 0) & (counts[Modality.TEXT] > 0))
        if cats.size == 0:
            raise ValueError("anchor bank: no category has members in both modalities of the offline data")
        feat, code, count = {}, {}, {}
        for m in MODALITIES:
            mem = np.asarray(members[m], dtype=np.float64)[:, cats]
            n = counts[m][cats]
            feat[m] = (mem.T @ np.asarray(feats[m], dtype=np.float64)) / n[:, None]
            code[m] = (mem.T @ np.asarray(relaxed[m], dtype=np.float64)) / n[:, None]
            count[m] = n
        bits = np.asarray(relaxed[Modality.IMAGE]).shape[1]
        empty = {m: np.zeros((len(cats), bits), np.float32) for m in MODALITIES}
        return cls(cats, feat, code, count, feat, empty, promote_after)

    def set_rehearsal_targets(self, targets: Mapping[Modality, np.ndarray]) -> None:
        for m in MODALITIES:
            if targets[m].shape != (len(self.initial_feat[m]), self.bits):
                raise ValueError(f"rehearsal targets for {m.short}: shape {targets[m].shape}")
            self.rehearsal_targets[m] = np.array(targets[m], dtype=np.float32)

    def __len__(self) -> int:
        return len(self.categories)

    @property
    def has_new_category(self) -> bool:
        """Whether a category the offline data lacked has been promoted to a row."""
        return len(self.categories) > len(self.initial_feat[Modality.IMAGE])

    @property
    def bits(self) -> int:
        return self.code[Modality.IMAGE].shape[1]

    def similarity(self, x: np.ndarray, modality: Modality) -> np.ndarray:
        """Cosine of ``x`` to the tier-1 anchors of its own modality, one value per row."""
        return cosine(x, self.feat[modality])

    def observe(self, modality: Modality, x: np.ndarray, h: np.ndarray, categories: Sequence[int]) -> list[int]:
        """Fold one item (feature ``x``, relaxed code ``h``) into the rows of its categories.

        Categories without a row go to the buffer. Returns the categories promoted to rows by this item.
        """
        promoted = []
        for cat in categories:
            row = self.row_of.get(cat)
            if row is not None:
                n = self.count[modality][row] + 1.0
                self.feat[modality][row] += (x - self.feat[modality][row]) / n
                self.code[modality][row] += (h - self.code[modality][row]) / n
                self.count[modality][row] = n
                continue
            buf = self.pending.setdefault(cat, _Pending())
            n = buf.count[modality] + 1
            if n == 1:
                buf.feat[modality] = np.array(x, dtype=np.float32)
                buf.code[modality] = np.array(h, dtype=np.float32)
            else:
                buf.feat[modality] += (x - buf.feat[modality]) / n
                buf.code[modality] += (h - buf.code[modality]) / n
            buf.count[modality] = n
            if all(buf.count[m] >= self.promote_after for m in MODALITIES):
                self._promote(cat)
                promoted.append(cat)
        return promoted

    def _promote(self, cat: int) -> None:
        buf = self.pending.pop(cat)
        self.row_of[cat] = len(self.categories)
        self.categories.append(cat)
        for m in MODALITIES:
            self.feat[m] = np.vstack([self.feat[m], buf.feat[m][None]])
            self.code[m] = np.vstack([self.code[m], buf.code[m][None]])
            self.count[m] = np.append(self.count[m], float(buf.count[m]))

    def tensors(self, prefix: str = "bank") -> dict[str, np.ndarray]:
        """Plain arrays under ``prefix.``; the buffer is stored as stacked rows with zero-filled gaps."""
        out = {f"{prefix}.categories": np.asarray(self.categories, dtype=np.int64)}
        pend = sorted(self.pending)
        out[f"{prefix}.pending.categories"] = np.asarray(pend, dtype=np.int64)
        for m in MODALITIES:
            s = m.short
            out[f"{prefix}.feat.{s}"] = self.feat[m]
            out[f"{prefix}.code.{s}"] = self.code[m]
            out[f"{prefix}.count.{s}"] = self.count[m]
            out[f"{prefix}.initial_feat.{s}"] = self.initial_feat[m]
            out[f"{prefix}.rehearsal_targets.{s}"] = self.rehearsal_targets[m]
            dims = {"feat": self.feat[m].shape[1], "code": self.bits}
            for tier, dim in dims.items():
                rows = [getattr(self.pending[c], tier).get(m, np.zeros(dim, np.float32)) for c in pend]
                out[f"{prefix}.pending.{tier}.{s}"] = np.asarray(rows, dtype=np.float32).reshape(len(pend), dim)
            out[f"{prefix}.pending.count.{s}"] = np.asarray([self.pending[c].count[m] for c in pend], dtype=np.int64)
        return out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, np.ndarray], promote_after: int) -> AnchorBank:
        """Inverse of :meth:`tensors` (the ``bank.`` prefix already stripped)."""
        pending = {}
        for i, cat in enumerate(tensors["pending.categories"]):
            buf = _Pending()
            for m in MODALITIES:
                n = int(tensors[f"pending.count.{m.short}"][i])
                buf.count[m] = n
                if n:
                    buf.feat[m] = np.array(tensors[f"pending.feat.{m.short}"][i], dtype=np.float32)
                    buf.code[m] = np.array(tensors[f"pending.code.{m.short}"][i], dtype=np.float32)
            pending[int(cat)] = buf

        def per(name: str) -> dict[Modality, np.ndarray]:
            return {m: tensors[f"{name}.{m.short}"] for m in MODALITIES}

        return cls(
            tensors["categories"],
            per("feat"),
            per("code"),
            per("count"),
            per("initial_feat"),
            per("rehearsal_targets"),
            promote_after,
            pending,
        )
