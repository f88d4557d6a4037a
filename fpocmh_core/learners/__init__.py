"""Online learners. Every learner implements :class:`fpocmh_core.learners.base.OnlineLearner`."""
