"""The checks every arrival and every query passes before it reaches a model or a stored code.

Database codes are written once and never re-hashed, so a bad value that reaches a model (as a
gradient) or the store (as a code) stays there for good. Every role that reads arrivals (encoder,
learner) runs :meth:`ArrivalCheck.check` on each decoded record, and the query role runs
:func:`check_query_features`; a failure is a :class:`~fpocmh_core.schemas.SchemaError` whose reason
names the kind of fault, so the message goes to the dead-letter topic with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fpocmh_core.records import ItemRecord, Modality
from fpocmh_core.schemas import SchemaError

# Item ids are non-negative (-1 pads answers) and at most 2^53 - 1, so they survive JSON clients.
MAX_ITEM_ID = 2**53 - 1
# Reasons of the dead letters these checks produce.
SHAPE = "shape"
INVALID = "invalid"


@dataclass(frozen=True)
class ArrivalCheck:
    """What an arrival must satisfy for the model in use: feature lengths, label count, finite values."""

    image_dim: int
    text_dim: int
    n_labels: int | None = None  # None: the model does not say (labels are then checked for values only)
    max_item_id: int = MAX_ITEM_ID

    def check(self, record: ItemRecord) -> ItemRecord:
        """``record`` unchanged, or raise :class:`SchemaError` (reason ``shape`` or ``invalid``)."""
        item, image, text = record.item_id, record.image, record.text
        if not 0 <= item <= self.max_item_id:
            raise SchemaError(INVALID, f"item id {item} outside [0, {self.max_item_id}]")
        if image is None and text is None:
            raise SchemaError(SHAPE, f"item {item}: an arrival needs at least one modality")
        if image is not None:
            _check_features(item, Modality.IMAGE, image, self.image_dim)
        if text is not None:
            _check_features(item, Modality.TEXT, text, self.text_dim)
        if record.labels is not None:
            self._check_labels(item, record.labels)
        return record

    def _check_labels(self, item: int, labels: np.ndarray) -> None:
        if labels.ndim != 1 or (self.n_labels is not None and labels.shape[0] != self.n_labels):
            want = "a 1-D vector" if self.n_labels is None else f"{self.n_labels} labels"
            raise SchemaError(SHAPE, f"item {item}: labels of shape {labels.shape}, expected {want}")
        if labels.dtype.itemsize == 1 and labels.dtype.kind in "ub":
            # Bytes: deleting every 0 and 1 byte leaves nothing, ten times faster than a numpy reduction.
            bad = bool(labels.tobytes().translate(None, b"\x00\x01"))
        else:
            fractional = labels.dtype.kind == "f" and (labels % 1).any()
            bad = labels.size and (labels.min() < 0 or labels.max() > 1 or fractional)
        if bad:
            raise SchemaError(INVALID, f"item {item}: labels must be 0/1 (multi-hot), got {np.unique(labels)[:5]}")


def _check_features(item: int, modality: Modality, features: np.ndarray, dim: int) -> None:
    problem = feature_problem(features, dim)
    if problem:
        raise SchemaError(problem[0], f"item {item}: {modality.short} {problem[1]}")


def finite_as_float32(features: np.ndarray) -> np.ndarray:
    """Elementwise: the value is finite after the cast to float32 the networks apply, so 1e300 (finite in
    float64, infinite in float32) counts as not finite. Integer features always are."""
    if features.dtype.kind != "f":
        return np.ones(features.shape, dtype=bool)
    if features.dtype.itemsize > 4:
        with np.errstate(over="ignore"):
            features = features.astype(np.float32)
    return np.isfinite(features)


def feature_problem(features: np.ndarray, dim: int) -> tuple[str, str] | None:
    """(reason, what is wrong) for a feature vector the model can't take, else None."""
    if features.ndim != 1 or features.shape[0] != dim:
        return SHAPE, f"features of shape {features.shape}, the model takes {dim}"
    if features.dtype.kind != "f":
        return None
    # A finite sum of squares means every value is finite (a NaN or Inf would carry through); one BLAS
    # call (vdot: an overflow gives Inf without a warning), faster than a mask and its test. Not finite, or
    # an overflow: the exact check.
    if features.dtype == np.float32 and math.isfinite(np.vdot(features, features)):
        return None
    finite = finite_as_float32(features)
    if not finite.all():
        return INVALID, f"features have {int((~finite).sum())} non-finite value(s) (NaN, Inf, or beyond float32)"
    return None


def check_query_features(features: np.ndarray, dim: int) -> tuple[str, str] | None:
    """(reason, what is wrong) when a query's (n, dim) feature matrix can't be hashed, else None."""
    if features.ndim != 2 or features.shape[1] != dim:
        return SHAPE, f"features of shape {features.shape}; the model takes {dim} dims per row"
    finite = finite_as_float32(features).all(axis=1)
    if not finite.all():
        rows = np.flatnonzero(~finite)[:5].tolist()
        return INVALID, f"non-finite features (NaN, Inf, or beyond float32) in row(s) {rows}"
    return None
