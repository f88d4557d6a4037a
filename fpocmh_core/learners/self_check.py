"""The learner's own measure of how far its stored codes and its model have parted, and the rehearsal
weight it steers with it.

The database's stored codes never change, the model keeps learning: retrieval over the stored codes and
over the same items re-hashed by the model now drift apart, either way. The reservoir
(learners/reservoir.py) is a uniform sample of the database holding each item's stored code, categories
and features, so the learner can measure that drift itself: queries of one modality from the reservoir,
hashed now, against the reservoir's codes of the other modality, stored versus re-hashed. On P3 (MIRFlickr,
seed 0, offline share 0.3 and 0.05, two rehearsal weights) this estimate, taken with 1,000 queries over all
8,192 slots, tracked the benchmark's stored minus re-hashed mAP on held-out queries within 0.001; the
default check takes 2,048 slots and 500 queries (docs/design-notes/self-check.md).

How hard rehearsal must hold the model to the stored codes depends on the offline model: with a strong
one the stored codes keep pace and lighter rehearsal learns new categories better; with a weak one the
model runs ahead of every stored code. :class:`RehearsalWeights` therefore sets each network's rehearsal
weight from the drift of the codes it wrote: halved while they keep pace, doubled once the model runs
ahead of them by more than ``band``, within [``min_weight``, the configured weight].
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fpocmh_core import codes, config, evaluation
from fpocmh_core.learners.reservoir import MODALITIES, CodeReservoir
from fpocmh_core.nets import HashModel
from fpocmh_core.records import Modality

SINCE = ("start", "new_category")
HOLD = ("never", "always", "before_new_category")


@dataclass(frozen=True)
class SelfCheckConfig:
    """Every ``every`` learnt views (0 = off), from the stream's start (``since: start``) or once the bank
    holds a category the offline part lacked (``since: new_category``), measure the drift on ``items``
    reservoir slots per modality (up to ``queries`` of them also query) and steer; ``band``: how far the
    model may run ahead of its stored codes (in mAP) before it is held tighter; ``min_weight`` and
    ``max_weight``: the range of the rehearsal weight (the configured weight is the maximum when larger);
    ``min_lr_scale``: how far the learning rate may be scaled down once the weight is at ``max_weight``;
    ``hold_codes``: while a modality's stored codes retrieve better than its re-hash by more than ``band``, its
    learner codes are held back (the arrival codes stand) until within ``band / 2``: ``never``, ``always``, or
    ``before_new_category`` (until the bank holds a category the offline part lacked); ``true`` and ``false``
    read as ``always`` and ``never``."""

    every: int
    items: int
    queries: int
    band: float
    min_weight: float
    max_weight: float
    min_lr_scale: float
    since: str
    two_sided: bool
    hold_codes: str | bool = "never"

    def __post_init__(self) -> None:
        if isinstance(self.hold_codes, bool):  # configs and states from before it had three values
            object.__setattr__(self, "hold_codes", "always" if self.hold_codes else "never")
        if self.every < 0 or self.items < 1 or self.queries < 1:
            raise config.ConfigError("fpocmh: code_rehearsal.self_check needs every >= 0, items >= 1 and queries >= 1")
        if self.band <= 0 or self.min_weight < 0:
            raise config.ConfigError("fpocmh: code_rehearsal.self_check needs band > 0 and min_weight >= 0")
        if not 0 < self.min_lr_scale <= 1:
            raise config.ConfigError("fpocmh: code_rehearsal.self_check.min_lr_scale must be in (0, 1]")
        if self.since not in SINCE:
            raise config.ConfigError(f"fpocmh: code_rehearsal.self_check.since must be one of {', '.join(SINCE)}")
        if self.hold_codes not in HOLD:
            raise config.ConfigError(f"fpocmh: code_rehearsal.self_check.hold_codes must be one of {', '.join(HOLD)}")


def stored_minus_rehashed(
    model: HashModel, reservoir: CodeReservoir, items: int, queries: int
) -> dict[Modality, float]:
    """Per modality m: mAP of the other modality's queries over m's stored codes minus over m's codes
    re-hashed by ``model``, on evenly spaced reservoir slots (empty dict while either modality is empty).
    Negative: the model has run ahead of the codes it stored."""
    sizes = {m: reservoir.size(m) for m in MODALITIES}
    if min(sizes.values()) == 0:
        return {}
    rows = {m: np.linspace(0, sizes[m] - 1, min(items, sizes[m])).astype(np.intp) for m in MODALITIES}
    now = {m: codes.pack(codes.sign_codes(model.relaxed(reservoir.features[m][rows[m]], m))) for m in MODALITIES}
    stored = {m: codes.pack(reservoir.codes[m][rows[m]]) for m in MODALITIES}
    labels = {m: reservoir.categories[m][rows[m]] for m in MODALITIES}
    gaps = {}
    for m in MODALITIES:
        q = m.other
        n = min(queries, rows[q].size)
        maps = [
            evaluation.mean_average_precision(now[q][:n], database, labels[q][:n], labels[m])
            for database in (stored[m], now[m])
        ]
        gaps[m] = maps[0] - maps[1]
    return gaps


class RehearsalWeights:
    """Each network's stored-code rehearsal weight and learning-rate scale, steered by the drift of the
    codes it wrote.

    Once the model runs ahead of its stored codes by more than ``band`` (mAP over stored codes minus over
    the same items re-hashed now below ``-band``; with ``two_sided`` also above ``band``), the network is held
    tighter: its
    rehearsal weight doubles up to ``max_weight`` (the configured weight when that is unset), then its
    learning rate halves down to ``min_lr_scale`` of the schedule's. While they keep pace (within
    ``band / 2``) it is let go in the reverse order: the learning rate back first, then the weight
    halved down to ``min_weight``. In between, nothing changes (hysteresis: one noisy check does not flip it).
    """

    def __init__(self, cfg: SelfCheckConfig, weight: float) -> None:
        self.cfg = cfg
        self.max_weight = max(cfg.max_weight, weight)
        self.weights = dict.fromkeys(MODALITIES, weight)
        self.lr_scales = dict.fromkeys(MODALITIES, 1.0)
        self.holding = dict.fromkeys(MODALITIES, False)
        self.gaps: dict[Modality, float] = {}

    def to_meta(self) -> dict[str, dict[str, float]]:
        """The weights, learning-rate scales and last drift, for the learner's state (JSON)."""
        return {
            "weights": {m.short: w for m, w in self.weights.items()},
            "lr_scales": {m.short: s for m, s in self.lr_scales.items()},
            "gaps": {m.short: g for m, g in self.gaps.items()},
            "holding": {m.short: h for m, h in self.holding.items()},
        }

    def load_meta(self, meta: Mapping[str, Mapping[str, float]]) -> None:
        """Inverse of :meth:`to_meta` (states written before the learning-rate scale load with 1.0)."""
        self.weights = {m: float(meta["weights"][m.short]) for m in MODALITIES}
        self.lr_scales = {m: float(meta.get("lr_scales", {}).get(m.short, 1.0)) for m in MODALITIES}
        self.gaps = {m: float(meta["gaps"][m.short]) for m in MODALITIES if m.short in meta["gaps"]}
        self.holding = {m: bool(meta.get("holding", {}).get(m.short, False)) for m in MODALITIES}

    def hold(self, gaps: Mapping[Modality, float]) -> None:
        """Hold back a modality's learner codes while its stored codes run ahead of a re-hash by more than
        ``band``; write them again once within ``band / 2`` (the same hysteresis as the weights)."""
        for m, gap in gaps.items():
            if gap > self.cfg.band:
                self.holding[m] = True
            elif gap < self.cfg.band / 2:
                self.holding[m] = False

    def update(self, gaps: Mapping[Modality, float], floor: float | None = None) -> None:
        """Steer on one self-check's ``gaps``; a weight is let go no lower than ``floor`` (None: ``min_weight``)."""
        self.gaps = dict(gaps)
        for m, gap in gaps.items():
            # Two-sided, stored codes that retrieve better than a re-hash (positive) count as parting too.
            apart = abs(gap) if self.cfg.two_sided else -gap
            if apart > self.cfg.band:
                self._tighten(m)
            elif apart < self.cfg.band / 2:
                self._loosen(m, self.cfg.min_weight if floor is None else max(floor, self.cfg.min_weight))

    def _tighten(self, m: Modality) -> None:
        if self.weights[m] < self.max_weight:
            self.weights[m] = min(self.max_weight, max(self.weights[m], self.cfg.min_weight, 1e-3) * 2)
        else:
            self.lr_scales[m] = max(self.cfg.min_lr_scale, self.lr_scales[m] / 2)

    def _loosen(self, m: Modality, floor: float) -> None:
        if self.lr_scales[m] < 1.0:
            self.lr_scales[m] = min(1.0, self.lr_scales[m] * 2)
        elif self.weights[m] > floor:
            self.weights[m] = max(floor, self.weights[m] / 2)
