"""Item records: what one stream event carries, independent of how it travels."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np


class Modality(IntEnum):
    IMAGE = 0
    TEXT = 1

    @property
    def short(self) -> str:
        return "img" if self is Modality.IMAGE else "txt"

    @property
    def other(self) -> Modality:
        return Modality(1 - self)

    @classmethod
    def parse(cls, name: str | int | Modality) -> Modality:
        if isinstance(name, Modality | int):
            return cls(int(name))
        key = name.strip().lower()
        for m in cls:
            if key in (m.short, m.name.lower()):
                return m
        raise ValueError(f"unknown modality {name!r}; expected one of image/img, text/txt")


@dataclass(frozen=True, slots=True, eq=False)
class ItemRecord:
    """One arrival. ``image`` or ``text`` may be missing (partial-modal); ``labels`` may be missing."""

    item_id: int
    image: np.ndarray | None
    text: np.ndarray | None
    labels: np.ndarray | None = None
    chunk: int = 0

    def __post_init__(self) -> None:
        if self.image is None and self.text is None:
            raise ValueError(f"item {self.item_id}: an arrival needs at least one modality")

    def features(self, modality: Modality) -> np.ndarray | None:
        return self.image if modality is Modality.IMAGE else self.text

    @property
    def modalities(self) -> tuple[Modality, ...]:
        return tuple(m for m in Modality if self.features(m) is not None)

    @property
    def is_paired(self) -> bool:
        return self.image is not None and self.text is not None
