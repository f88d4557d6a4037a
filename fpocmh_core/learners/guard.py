"""Learning that never leaves a non-finite number behind: a batch is undone unless everything stays finite.

One NaN in a learner's parameters would reach every later model version and, through them, every code
the encoders write from then on, into a database that is never re-hashed. :class:`GuardedLearner`
keeps the state from before each batch; when ``learn`` raises, or a loss, an accumulated gradient or a
parameter is not finite afterwards, it puts that state back (bank, optimiser, RNG included: the
learner is exactly as if the batch never came) and raises :class:`NonFiniteStep` or the original error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from fpocmh_core.learners.base import LearnReport, OnlineLearner
from fpocmh_core.records import ItemRecord
from fpocmh_core.state import ModelState


class NonFiniteStep(ArithmeticError):
    """A batch made a loss, gradient or parameter non-finite; the learner was rolled back."""


def nonfinite(report: LearnReport, learner: OnlineLearner) -> str | None:
    """What is not finite after a batch (a loss term, a parameter, an accumulated gradient), or None."""
    bad = [term for term, value in report.losses.items() if not math.isfinite(value)]
    if bad:
        return f"loss term(s) {', '.join(sorted(bad))} not finite"
    for name, param in learner.model.named_parameters():
        if not bool(torch.isfinite(param).all()):
            return f"parameter {name} not finite"
        if param.grad is not None and not bool(torch.isfinite(param.grad).all()):
            return f"gradient of {name} not finite"
    return None


class GuardedLearner:
    """Runs ``learn`` on a learner and rolls the learner back when a batch fails (see the module docstring)."""

    def __init__(self, learner: OnlineLearner) -> None:
        self.learner = learner
        self.rollbacks = 0

    def learn(self, batch: Sequence[ItemRecord]) -> LearnReport:
        return self._undoable(lambda: self.learner.learn(batch), f"a batch of {len(batch)}")

    def flush(self) -> LearnReport:
        """The learner's :meth:`~OnlineLearner.flush` (what it buffers, learnt), under the same guard."""
        return self._undoable(self.learner.flush, "a flush")

    def _undoable(self, step: Callable[[], LearnReport], what: str) -> LearnReport:
        saved = self.learner.export_state().detached()
        try:
            report = step()
        except Exception:
            self._restore(saved)
            raise
        problem = nonfinite(report, self.learner)
        if problem:
            self._restore(saved)
            raise NonFiniteStep(f"{problem} after {what}; rolled back")
        return report

    def _restore(self, saved: ModelState) -> None:
        self.learner = type(self.learner).from_state(saved)
        self.rollbacks += 1
