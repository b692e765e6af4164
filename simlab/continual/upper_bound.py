"""The static upper bound: every hospital trains, from the first round, on its whole stream at once.

ODEx (Table 1, first row): "the upper bound of training a model statically with all training data".
Here each round a hospital trains on an i.i.d. sample drawn without replacement from the union of the
labelled images of **every** window of its own stream, rounds 1..T (``federation.rounds``), future
rounds included. Its training distribution is the same in every round, so its model never sees a
drift. It is a reference, never a deployable method: it breaks the no-rehearsal rule and it uses data
that has not arrived yet (``breaks_no_rehearsal``, ``uses_future_data``; every table labels it
*upper bound (static, all data)*).

Where it deviates from the paper, and why: the paper trains one model offline on the pooled data of
all stages. Here the federation is kept (the same rounds, aggregation and communication as the other
arms) and so is the compute: the sample has as many images as round t's labelled window, so a round
takes the same local steps (or, with ``local_epochs``, the same batches) at the same batch size as
sequential fine-tuning, and FedAvg weighs the hospital as it does for every other method. The sample
is redrawn each round (seeded per hospital and round), so over the run the hospital sees its whole
stream. Only the sampled images are copied; the windows come from the stream's caches (in the
process, then on disk). Cost: the first round makes (or reads) every window of the stream, which
sequential fine-tuning pays round by round; later rounds cost what a sequential round costs.

Its BWT and FWT mean nothing: with no drift in what it trains on, "before" and "after" a stage are
the same training distribution (the paper reports only Dice for it). Read its final Dice per domain.
"""

from __future__ import annotations

import numpy as np

from simlab.continual.method import Method
from simlab.seeding import derive_seed


class UpperBound(Method):
    name = "upper_bound"
    help = ("REFERENCE that uses all of the stream's data from round 1 (future rounds too): trains each round "
            "on an i.i.d. sample of the union of every window, the static upper bound")
    family = "rehearsal"  # a reference that revisits (and pre-visits) data, like replay
    breaks_no_rehearsal = True
    uses_future_data = True

    def training_rounds(self, t, state):
        raise NotImplementedError("upper_bound draws from every round of the stream: see training_set")

    def training_set(self, windows, t, state, seed, last_round):
        if last_round is None or last_round < t:
            raise ValueError(f"upper_bound needs the stream's last round (found {last_round!r} in round {t})")
        rounds = list(range(1, last_round + 1))
        labelled = {r: np.flatnonzero(windows(r).labeled) for r in rounds}
        offsets = np.cumsum([0] + [len(labelled[r]) for r in rounds])
        n = len(labelled[t])
        draw = np.sort(np.random.default_rng(derive_seed(seed, "upper_bound")).choice(offsets[-1], n, replace=False))
        xs, ys, used = [], [], []
        for i, r in enumerate(rounds):
            picked = draw[(draw >= offsets[i]) & (draw < offsets[i + 1])] - offsets[i]
            if len(picked):
                w, idx = windows(r), labelled[r][picked]
                xs.append(w.images[idx])
                ys.append(w.labels[idx])
                used.append(r)
        return np.concatenate(xs), np.concatenate(ys), used
