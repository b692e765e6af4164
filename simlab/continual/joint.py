"""Joint training over the stream so far: each round trains on *every* window this hospital has
trained on, with the same number of steps as the other methods. It breaks the no-rehearsal (privacy)
rule on purpose and is labelled so wherever it is reported; it is a compute-matched replay
reference, not an upper bound."""

from __future__ import annotations

import numpy as np

from simlab.continual.method import Method


class Joint(Method):
    name = "joint"
    help = "REFERENCE that breaks the no-rehearsal rule on purpose: trains on every window seen so far"
    family = "rehearsal"
    breaks_no_rehearsal = True
    keeps_state = True

    def training_rounds(self, t, state):
        return [int(r) for r in state.get("seen_rounds", np.zeros(0, np.int64))] + [t]

    def after_round(self, model, images, labels, rounds, state, cfg, seed):
        return {"seen_rounds": np.asarray(rounds, dtype=np.int64)}
