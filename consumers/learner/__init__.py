"""The learner role: arrivals in (its own group), model versions out, checkpoints on disk.

``role`` learns and guards; ``publisher`` checkpoints and publishes versions off the poll loop;
``pacing`` samples the backlog when arrivals outrun it; ``held_codes`` holds the codes the learner assigns
itself until the encoder's code of the same view is on the codes topic.
"""
