"""The learner contract shared by FPO-CMH, DLCH and the baselines.

Split as in river: ``learn`` changes state, ``encode`` never does. A learner publishes its state as a
versioned :class:`ModelState`; encoders and query consumers rebuild a :class:`HashModel` from it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from fpocmh_core.data import CrossModalDataset
from fpocmh_core.nets import HashModel
from fpocmh_core.records import ItemRecord, Modality
from fpocmh_core.state import ModelState


@dataclass(frozen=True)
class CodeRecord:
    """A database code a learner asks the pipeline to store (DLCH learns codes for new items)."""

    item_id: int
    modality: Modality
    code: np.ndarray  # packed uint8, bits/8 bytes
    present: tuple[Modality, ...] = ()  # modalities the item arrived with, when the learner knows them


@dataclass
class LearnReport:
    """What one ``learn`` call did: optimiser steps per modality, mean loss terms, codes to publish.

    ``outcomes`` counts arrivals by what the learner did with them, each arrival once, when that is
    decided (a learner that buffers decides later); ``pending`` is how many arrivals it holds undecided
    after the call. Learners that learn from every arrival as it comes may leave both empty.
    """

    items: int = 0
    steps: dict[str, int] = field(default_factory=lambda: {"img": 0, "txt": 0})
    losses: dict[str, float] = field(default_factory=dict)
    codes: list[CodeRecord] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)
    pending: int = 0


class OnlineLearner(ABC):
    """Learns from arrivals; encodes with its current hash model; exports and imports versioned state."""

    method: str = "abstract"

    def __init__(self, model: HashModel) -> None:
        self.model = model
        self.version = 0
        self.parent_version: int | None = None

    @property
    def bits(self) -> int:
        return self.model.bits

    @property
    def bank_rows(self) -> int | None:
        """Rows (categories) of the learner's anchor bank; None for methods without one."""
        return None

    @property
    def uncoded(self) -> int:
        """Learnt views whose codes the learner will assign later (FPO-CMH codes them in blocks); a
        :meth:`flush` codes them."""
        return 0

    @property
    def rehearsal(self) -> dict[Modality, tuple[float, float]]:
        """Per network: (stored minus re-hashed mAP its last self-check measured, the rehearsal weight it
        steers); empty for methods without one (:mod:`fpocmh_core.learners.self_check`)."""
        return {}

    @abstractmethod
    def learn(self, batch: Sequence[ItemRecord]) -> LearnReport:
        """Update from a batch of arrivals (in arrival order)."""

    def encode(self, x: np.ndarray, modality: Modality) -> np.ndarray:
        """Packed codes from the current model. Pure: never changes the learner."""
        return self.model.encode(x, modality)

    def flush(self) -> LearnReport:
        """Act on whatever the learner buffers (the stream paused or ended); nothing to do by default."""
        return LearnReport()

    @abstractmethod
    def export_state(self) -> ModelState:
        """The learner's full state at ``self.version`` (model tensors under ``model.``, ``meta["arch"]``)."""

    @classmethod
    @abstractmethod
    def from_state(cls, state: ModelState) -> OnlineLearner:
        """Rebuild a learner (same version, same future behaviour) from :meth:`export_state`'s output."""

    @classmethod
    @abstractmethod
    def bootstrap(
        cls,
        ds: CrossModalDataset,
        rows: np.ndarray,
        bits: int,
        overrides: dict | None = None,
        progress: bool = True,
    ) -> OnlineLearner:
        """Version 0: train the method's offline/original phase on the paired, labelled ``rows``."""

    def bump_version(self) -> int:
        """Called by whoever publishes: the next export carries a new version and its parent."""
        self.parent_version, self.version = self.version, self.version + 1
        return self.version


# What a model update on the wire carries: the hash networks (all that encoders and query consumers use),
# the anchor bank, and the probe set readers check a version on (fpocmh_core/model_check.py). Optimiser
# state, accumulated gradients and rehearsal samples stay in the learner's checkpoints; they would
# triple the update's size for readers that never look at them.
PUBLISHED_PREFIXES = ("model", "bank", "probe")


def published(state: ModelState) -> ModelState:
    """The part of a learner's state that is published as a model update."""
    return state.only(*PUBLISHED_PREFIXES)


def model_from_state(state: ModelState) -> HashModel:
    """The hash model inside any learner's state: what encoders and query consumers need."""
    return HashModel.from_tensors(state.meta["arch"], state.subset("model"))
