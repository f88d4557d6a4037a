"""FPO-CMH's configuration: the paper's hyper-parameters and each deviation's own settings, one frozen tree.

Built from ``config/fpocmh.yaml`` (:func:`load_config`); every key is documented there with the measurement
that chose its default."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fpocmh_core import config
from fpocmh_core.learners import common
from fpocmh_core.learners.self_check import SelfCheckConfig

SPACES = ("auto", "separate", "joint")
RESERVOIR_CODES = ("stored", "arrival")


@dataclass(frozen=True)
class CodeRehearsalConfig:
    """Stored-code rehearsal (see the module docstring): ``items`` offline items kept with their stored
    codes, ``batch`` of them drawn at every optimiser step, their squared error weighted by ``weight``.
    ``stream``: draw the batch from the reservoir (offline items, then arrivals) instead."""

    items: int
    batch: int
    weight: float
    stream: bool
    # The weight once the bank holds a category the offline part lacked (None: ``weight`` throughout).
    new_category_weight: float | None
    # From then on, each network's weight steered by the learner's own drift measure (learners/self_check.py),
    # where the reservoir keeps features (``stream``) and no fixed ``new_category_weight`` is set.
    self_check: SelfCheckConfig

    @property
    def self_checked(self) -> bool:
        return bool(self.self_check.every) and self.stream and self.new_category_weight is None

    def __post_init__(self) -> None:
        if self.items < 0 or self.batch < 1 or self.weight < 0 or (self.new_category_weight or 0) < 0:
            raise config.ConfigError(
                "fpocmh: code_rehearsal needs items >= 0, batch >= 1, weight >= 0 and new_category_weight >= 0"
            )

    def weight_for(self, new_category: bool) -> float:
        return self.new_category_weight if new_category and self.new_category_weight is not None else self.weight


@dataclass(frozen=True)
class LrScheduleConfig:
    """Each modality's learning rate at its n-th optimiser step: ``optimizer.lr * start / (1 + n / decay_steps)``
    (``decay_steps`` 0: ``optimizer.lr * start`` throughout; start 1 and decay_steps 0 = the paper)."""

    start: float
    decay_steps: float
    # A category promoted into the bank (a new one the stream brought) starts the schedule over.
    restart_on_new_category: bool
    # ``start`` from the first category the offline part lacked on (None: ``start`` throughout).
    restart_start: float | None

    def __post_init__(self) -> None:
        if self.start <= 0 or self.decay_steps < 0 or (self.restart_start is not None and self.restart_start <= 0):
            raise config.ConfigError("fpocmh: lr_schedule needs start > 0, restart_start > 0 and decay_steps >= 0")

    def factor(self, steps: int, new_category: bool = False) -> float:
        start = self.restart_start if new_category and self.restart_start is not None else self.start
        return start / (1.0 + steps / self.decay_steps) if self.decay_steps > 0 else start


@dataclass(frozen=True)
class ReservoirConfig:
    """The reservoir of items with their stored codes (learners/reservoir.py): ``items`` slots per modality
    (0 = none); ``inferred``: arrivals without labels join it with the categories the bank gave them;
    ``codes``: ``stored`` = a slot takes the learner code once it is written, ``arrival`` = it keeps the
    code the view arrived with."""

    items: int
    inferred: bool
    codes: str

    def __post_init__(self) -> None:
        if self.items < 0:
            raise config.ConfigError("fpocmh: reservoir.items must be >= 0")
        if self.codes not in RESERVOIR_CODES:
            raise config.ConfigError(f"fpocmh: reservoir.codes must be one of {RESERVOIR_CODES}, got {self.codes!r}")


@dataclass(frozen=True)
class PairwiseConfig:
    """Pairwise term against stored codes (see the module docstring): each arrival is compared with ``sample``
    reservoir codes of each modality, the same-modality ones weighted ``intra``; ``weight`` 0 = off."""

    weight: float
    intra: float
    scale: float
    sample: int

    def __post_init__(self) -> None:
        if self.weight < 0 or self.intra < 0 or self.sample < 1:
            raise config.ConfigError("fpocmh: pairwise needs weight, intra >= 0 and sample >= 1")


@dataclass(frozen=True)
class FpocmhConfig:
    seed: int
    bits: int
    feature_space: str
    category_embeddings: str | None
    use_labels: bool
    theta: float
    similarity_scale: float
    logit_scale: float
    mu: int
    alpha: float
    beta: float
    gamma: float
    phi: float
    is_accessible_bank_count: int
    lr_schedule: LrScheduleConfig
    code_rehearsal: CodeRehearsalConfig
    reservoir: ReservoirConfig
    pairwise: PairwiseConfig
    learner_codes: bool
    # Learnt views wait until this many wait, then all are coded (0: each batch's views after the batch).
    learner_codes_block: int
    # Online steps with the networks' dropout on (true) or off (false); offline training always uses it.
    online_dropout: bool
    optimizer: common.OptimizerConfig
    offline: dict[str, Any]

    def __post_init__(self) -> None:
        if self.feature_space not in SPACES:
            raise config.ConfigError(f"fpocmh: feature_space must be one of {SPACES}, got {self.feature_space!r}")
        if self.mu < 1 or self.is_accessible_bank_count < 1:
            raise config.ConfigError("fpocmh: mu and is_accessible_bank_count must be >= 1")
        if self.learner_codes_block < 0:
            raise config.ConfigError("fpocmh: learner_codes_block must be >= 0")
        if self.reservoir.items == 0 and (self.pairwise.weight > 0 or self.code_rehearsal.stream):
            raise config.ConfigError("fpocmh: pairwise.weight > 0 and code_rehearsal.stream need reservoir.items > 0")


def load_config(path: Path | str | None = None, overrides: Mapping[str, Any] | None = None) -> FpocmhConfig:
    return config.load(FpocmhConfig, "fpocmh", path, overrides)


def load_vocabulary(path: str | Path) -> np.ndarray:
    """Category embeddings E (V x d) for zero-shot labelling in a joint space."""
    arr = np.load(path, allow_pickle=False)
    if isinstance(arr, np.lib.npyio.NpzFile):
        with arr:
            if "embeddings" not in arr.files:
                raise ValueError(f"{path}: expected key 'embeddings'; the file has {arr.files}")
            arr = arr["embeddings"]
    if arr.ndim != 2:
        raise ValueError(f"{path}: category embeddings must be 2-D (categories x dims), got {arr.shape}")
    return np.asarray(arr, dtype=np.float32)
