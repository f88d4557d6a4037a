"""Checks a model version passes before it is published, and again before a role applies it.

A version that codes every item alike (collapsed) or carries non-finite weights would write useless
codes into a database that is never re-hashed. So every published state carries a *probe*: a small
seeded sample of the data version 0 was trained on (``probe.img``, ``probe.txt``) and the dataset's
label count (``meta["n_labels"]``, which the arrival check uses). Roles keep the probe of the first
version they accepted and check every later version on it, so an update cannot bring its own easier
probe.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from fpocmh_core import codes
from fpocmh_core.nets import HashModel
from fpocmh_core.records import Modality
from fpocmh_core.state import ModelState

PROBE_PREFIX = "probe"
N_LABELS_META = "n_labels"


@dataclass(frozen=True)
class ModelCheckConfig:
    """Thresholds of :func:`model_problems` (``config/pipeline.yaml``, ``model_check``)."""

    probe_items: int  # rows of the probe sample drawn at version 0
    min_distinct_share: float  # distinct codes / distinct probe inputs, per modality
    max_constant_bit_share: float  # bits equal on every probe row / bits, per modality


@dataclass(frozen=True)
class Probe:
    """Features of a few real items per modality, and the dataset's label count."""

    image: np.ndarray
    text: np.ndarray
    n_labels: int | None

    def features(self, modality: Modality) -> np.ndarray:
        return self.image if modality is Modality.IMAGE else self.text

    @classmethod
    def draw(cls, image: np.ndarray, text: np.ndarray, n_labels: int, rows: int, seed: int = 0) -> Probe:
        """A seeded sample of ``rows`` paired items (float16: small on the wire, precise enough to code)."""
        take = np.sort(np.random.default_rng([seed, 7]).choice(len(image), min(rows, len(image)), replace=False))
        return cls(image[take].astype(np.float16), text[take].astype(np.float16), int(n_labels))

    @classmethod
    def of(cls, state: ModelState) -> Probe | None:
        """The probe a state carries, or None (states written before probes existed)."""
        found = state.subset(PROBE_PREFIX)
        if not {"img", "txt"} <= found.keys():
            return None
        n_labels = state.meta.get(N_LABELS_META)
        return cls(np.asarray(found["img"]), np.asarray(found["txt"]), None if n_labels is None else int(n_labels))

    def attach(self, state: ModelState) -> ModelState:
        """``state`` with this probe in its tensors and the label count in its meta."""
        tensors = {**state.tensors, f"{PROBE_PREFIX}.img": self.image, f"{PROBE_PREFIX}.txt": self.text}
        return replace(state, tensors=tensors, meta={**state.meta, N_LABELS_META: self.n_labels})


def model_problems(model: HashModel, probe: Probe | None, cfg: ModelCheckConfig) -> list[str]:
    """What is wrong with ``model`` (empty when nothing): non-finite weights, or collapsed probe codes."""
    bad = [name for name, value in model.state_dict().items() if not bool(value.isfinite().all())]
    if bad:
        return [f"non-finite weights in {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}"]
    if probe is None:
        return []
    problems = []
    for modality in (Modality.IMAGE, Modality.TEXT):
        x = probe.features(modality).astype(np.float32)
        if x.shape[1] != model.net(modality).in_dim:
            problems.append(f"{modality.short}: takes {model.net(modality).in_dim} dims, the probe has {x.shape[1]}")
            continue
        relaxed = model.relaxed(x, modality)
        if not np.isfinite(relaxed).all():
            problems.append(f"{modality.short}: non-finite outputs on the probe set")
            continue
        signs = codes.sign_codes(relaxed)
        # Relative to the distinct inputs: probe items with identical features (no tags) share a code anyway.
        distinct = len(np.unique(codes.pack(signs), axis=0)) / len(np.unique(x, axis=0))
        constant = float(np.mean(np.all(signs == signs[:1], axis=0)))
        if distinct < cfg.min_distinct_share:
            problems.append(
                f"{modality.short}: collapsed, distinct codes for {distinct:.0%} of the distinct probe inputs "
                f"(min {cfg.min_distinct_share:.0%})"
            )
        if constant > cfg.max_constant_bit_share:
            problems.append(
                f"{modality.short}: {constant:.0%} of bits constant on the probe set "
                f"(max {cfg.max_constant_bit_share:.0%})"
            )
    return problems
