"""The in-memory dataset every protocol, learner and benchmark works on."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class DatasetError(ValueError):
    """A dataset file is missing, malformed or inconsistent. The message names file, key and rows."""


def _rows(mask: np.ndarray, limit: int = 5) -> str:
    idx = np.flatnonzero(mask)
    shown = ", ".join(str(i) for i in idx[:limit])
    return f"{idx.size} row(s): {shown}{', ...' if idx.size > limit else ''}"


def check_features(arr: np.ndarray, key: str, where: str) -> None:
    """2-D and finite; loaders call it with the file's own key so the message points into the file."""
    if arr.ndim != 2:
        raise DatasetError(f"{where}: {key} must be 2-D (items x dims), got shape {arr.shape}")
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        raise DatasetError(f"{where}: {key} has NaN or inf in {_rows(bad)}")


def check_labels(arr: np.ndarray, key: str, where: str) -> None:
    """2-D, multi-hot 0/1 and no item without a label (relevance would be undefined for it)."""
    if arr.ndim != 2:
        raise DatasetError(f"{where}: {key} must be 2-D (items x dims), got shape {arr.shape}")
    if not np.isin(arr, (0, 1)).all():
        raise DatasetError(f"{where}: {key} must be multi-hot 0/1")
    empty = arr.sum(axis=1) == 0
    if empty.any():
        raise DatasetError(f"{where}: {key} has empty label rows in {_rows(empty)}")


def check_aligned(arrays: dict[str, np.ndarray], where: str) -> None:
    """One row per item in every array, so row i of each modality describes the same item."""
    if len({arr.shape[0] for arr in arrays.values()}) > 1:
        shapes = ", ".join(f"{key} {arr.shape}" for key, arr in arrays.items())
        raise DatasetError(f"{where}: row counts disagree ({shapes}); rows must be aligned across modalities")


@dataclass(frozen=True, eq=False)
class CrossModalDataset:
    """Paired image/text features with multi-hot labels.

    ``split`` marks query rows with 1 and database rows with 0 when the file suggests a split;
    ``feature_space`` is ``"separate"`` when the two modalities live in different spaces (our
    benchmark) and ``"joint"`` when they share one (CLIP-like features).
    """

    name: str
    image: np.ndarray
    text: np.ndarray
    labels: np.ndarray
    split: np.ndarray | None = None
    label_names: tuple[str, ...] = ()
    feature_space: str = "separate"
    source: str = ""
    extras: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = self.source or self.name
        check_features(self.image, "image", where)
        check_features(self.text, "text", where)
        check_labels(self.labels, "labels", where)
        check_aligned({"image": self.image, "text": self.text, "labels": self.labels}, where)
        n = self.image.shape[0]
        if self.split is not None and self.split.shape != (n,):
            raise DatasetError(f"{where}: split must have shape ({n},), got {self.split.shape}")
        if self.label_names and len(self.label_names) != self.labels.shape[1]:
            raise DatasetError(f"{where}: {len(self.label_names)} label names for {self.labels.shape[1]} label columns")
        if self.feature_space not in ("separate", "joint"):
            raise DatasetError(f"{where}: feature_space must be 'separate' or 'joint'")

    def __len__(self) -> int:
        return self.image.shape[0]

    @property
    def n_labels(self) -> int:
        return self.labels.shape[1]

    @property
    def dims(self) -> tuple[int, int]:
        return self.image.shape[1], self.text.shape[1]

    def label_index(self, name: str) -> int:
        if name not in self.label_names:
            raise DatasetError(f"{self.source or self.name}: no label named {name!r}; have {self.label_names}")
        return self.label_names.index(name)

    def with_features(self, image: str | None = None, text: str | None = None) -> CrossModalDataset:
        """The same items with another feature array of the file as the image and/or text modality
        (``text="txt_minilm"``); ``image``/``text`` None, ``"img_feat"`` or ``"txt_feat"`` keep the default."""
        chosen = {}
        for modality, key, default in (("image", image, "img_feat"), ("text", text, "txt_feat")):
            if key in (None, default):
                continue
            if key not in self.extras or self.extras[key].ndim != 2:
                usable = sorted(k for k, v in self.extras.items() if v.ndim == 2)
                raise DatasetError(
                    f"{self.source or self.name}: no feature array {key!r} for the {modality} modality; "
                    f"the file has {['img_feat', 'txt_feat', *usable]}"
                )
            chosen[modality] = self.extras[key].astype(np.float32)
        if not chosen:
            return self
        return dataclasses.replace(self, name=f"{self.name}[{image or 'img_feat'},{text or 'txt_feat'}]", **chosen)

    def fingerprint(self) -> str:
        """A short content hash, recorded in checkpoint manifests."""
        h = hashlib.sha256()
        for arr in (self.image, self.text, self.labels):
            h.update(str(arr.shape).encode())
            h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()[:16]


def require_keys(keys: set[str], needed: tuple[str, ...], path: Path | str) -> None:
    missing = [k for k in needed if k not in keys]
    if missing:
        raise DatasetError(f"{path}: missing key(s) {missing}; the file has {sorted(keys)}")
