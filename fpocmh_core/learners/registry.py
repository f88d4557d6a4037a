"""Learners by method name: what ``method:`` in a config and ``ModelState.method`` refer to."""

from __future__ import annotations

import importlib

from fpocmh_core.learners.base import OnlineLearner
from fpocmh_core.state import ModelState

LEARNERS = {
    "fpocmh": "fpocmh_core.learners.fpocmh:FpocmhLearner",
    "naive": "fpocmh_core.learners.naive:NaiveLearner",
    "dlch": "fpocmh_core.learners.dlch:DlchLearner",
}


def learner_class(method: str) -> type[OnlineLearner]:
    if method not in LEARNERS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(LEARNERS)}")
    module_name, _, cls_name = LEARNERS[method].partition(":")
    return getattr(importlib.import_module(module_name), cls_name)


def learner_from_state(state: ModelState) -> OnlineLearner:
    return learner_class(state.method).from_state(state)
