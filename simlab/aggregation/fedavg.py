"""FedAvg (McMahan et al. 2017): α_k = n_k / Σ_j n_j, n_k = number of local training examples."""

from __future__ import annotations

import numpy as np

from simlab.aggregation.core import WeightingRule, distances_to_mean


class FedAvg(WeightingRule):
    name = "fedavg"
    help = "weights ∝ n_k"

    def weights(self, models, counts, dist_keys):
        distances = distances_to_mean(models, dist_keys)
        total = float(sum(counts))
        return np.asarray([c / total for c in counts], dtype=np.float64), distances
