"""The learner's pacing: learn from a sample of the backlog when arrivals outrun it, so its lag stays bounded.

FPO-CMH costs about a millisecond per arrival on one core, so a stream of a few thousand items per
second outruns the learner. Reading an arrival costs microseconds; learning from it is what costs. So
the learner reads everything (its offsets, checkpoints and publishing cadence stay as they are) and
learns from a share of it: each arrival is kept with probability ``share``, drawn independently from a
seeded generator, i.e. a uniform sample within every partition. The share follows the lag: while the
lag (messages behind the partitions' ends, or the age of the newest message read) is over the bound,
the share drops by a quarter per batch; once the lag is under half the bound it grows back by a quarter,
up to 1. So the learner settles at the share it can afford, and the lag near the bound instead of
growing without end. Skipped arrivals are counted (``fpocmh_learner_items_total{outcome="skipped"}``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MIN_SHARE = 0.01
STEP = 0.75


@dataclass(frozen=True)
class PacingConfig:
    """``learner.pacing`` in the pipeline config: the lag bound, in messages and/or seconds (0: none)."""

    max_lag_items: int
    max_lag_s: float
    seed: int


class Pacer:
    """The share of arrivals to learn from, adjusted once per batch from the measured lag."""

    def __init__(self, cfg: PacingConfig) -> None:
        self.cfg = cfg
        self.share = 1.0
        self.max_lag_items = 0
        self._rng = np.random.default_rng(cfg.seed)

    def over(self, lag_items: int, lag_s: float) -> float:
        """How far over its bound the lag is (> 1: over; the larger of the two bounds' ratios; 0: no bound)."""
        ratios = []
        if self.cfg.max_lag_items > 0:
            ratios.append(lag_items / self.cfg.max_lag_items)
        if self.cfg.max_lag_s > 0:
            ratios.append(lag_s / self.cfg.max_lag_s)
        return max(ratios, default=0.0)

    def update(self, lag_items: int, lag_s: float) -> float:
        self.max_lag_items = max(self.max_lag_items, lag_items)
        ratio = self.over(lag_items, lag_s)
        if ratio > 1.0:
            self.share = max(MIN_SHARE, self.share * STEP)
        elif ratio < 0.5:
            self.share = min(1.0, self.share / STEP)
        return self.share

    def sample(self, items: Sequence[object]) -> list[int]:
        """Indices of the items to learn from (all of them while the share is 1)."""
        if self.share >= 1.0:
            return list(range(len(items)))
        return np.flatnonzero(self._rng.random(len(items)) < self.share).tolist()
