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

With an unlabelled-data objective (``federation.semi_supervised``) its unlabelled images are drawn
the same way, as many as round t's window holds unlabelled, from the unlabelled images of every
window; a hospital without labels has an empty labelled sample and trains through the objective alone.

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
        images, labels, used = _draw(windows, t, seed, last_round, labelled=True)
        return images, labels, used or [t]

    def unlabelled_set(self, windows, t, rounds, seed, last_round):
        """As many unlabelled images as round t's window holds, drawn the same way from every window's
        unlabelled images (images only)."""
        return _draw(windows, t, seed, last_round, labelled=False)[0]


def _draw(windows, t: int, seed: int, last_round: int | None, labelled: bool
          ) -> tuple[np.ndarray, np.ndarray | None, list[int]]:
    """An i.i.d. sample without replacement, of round t's count, from the labelled (or unlabelled)
    images of every window 1..``last_round``: (images, labels or None, the rounds they came from). A
    stream with no such image gives empty arrays (a hospital without labels has no labelled sample)."""
    if last_round is None or last_round < t:
        raise ValueError(f"upper_bound needs the stream's last round (found {last_round!r} in round {t})")
    rounds = list(range(1, last_round + 1))
    chosen = {r: np.flatnonzero(windows(r).labeled == labelled) for r in rounds}
    offsets = np.cumsum([0] + [len(chosen[r]) for r in rounds])
    purpose = "upper_bound" if labelled else "upper_bound_unlabelled"
    draw = np.sort(np.random.default_rng(derive_seed(seed, purpose)).choice(offsets[-1], len(chosen[t]), replace=False))
    xs, ys, used = [], [], []
    for i, r in enumerate(rounds):
        picked = draw[(draw >= offsets[i]) & (draw < offsets[i + 1])] - offsets[i]
        if len(picked):
            w, idx = windows(r), chosen[r][picked]
            xs.append(w.images[idx])
            if labelled:
                ys.append(w.labels[idx])
            used.append(r)
    if not xs:
        w = windows(t)
        return w.images[:0], (w.labels[:0] if labelled else None), []
    return np.concatenate(xs), (np.concatenate(ys) if labelled else None), used
