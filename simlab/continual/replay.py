"""Replay: each round trains on *every* window this hospital has trained on, with the same number of
steps as the other methods (a compute-matched rehearsal reference). It breaks the no-rehearsal
(privacy) rule on purpose and is labelled so wherever it is reported. It is not an upper bound: the
same steps are spread over more and more windows, so it can fit the current window worse than
sequential fine-tuning does. The static upper bound is :mod:`simlab.continual.upper_bound`."""

from __future__ import annotations

import numpy as np

from simlab.continual.method import Method


class Replay(Method):
    name = "replay"
    help = ("REFERENCE that breaks the no-rehearsal rule on purpose: trains on every window seen so far "
            "(same steps per round; not an upper bound)")
    family = "rehearsal"
    breaks_no_rehearsal = True
    keeps_state = True

    def training_rounds(self, t, state):
        return [int(r) for r in state.get("seen_rounds", np.zeros(0, np.int64))] + [t]

    def after_round(self, model, images, labels, rounds, state, cfg, seed):
        return {"seen_rounds": np.asarray(rounds, dtype=np.int64)}
