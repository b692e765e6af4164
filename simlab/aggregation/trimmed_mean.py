"""Coordinate-wise trimmed mean (Yin et al. 2018): per coordinate, the ⌊β·K⌋ smallest and the ⌊β·K⌋
largest of the K values are dropped and the rest averaged (``scipy.stats.trim_mean``, the same
definition as Flower's ``FedTrimmedAvg``). Example counts are ignored. With ⌊β·K⌋ = 0 (for instance
β = 0.2 and K ≤ 4) nothing is trimmed and the rule is the plain mean.

Flower 1.41's ``flwr.serverapp.strategy.fedtrimmedavg.trim_mean`` is not called because this package
is the Flower-free core; ``tests/test_aggregation.py`` checks that both give the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from simlab.aggregation.core import CoordinateRule


@dataclass(frozen=True)
class TrimmedMeanParams:
    beta: float = field(default=0.2, metadata={"ge": 0.0, "lt": 0.5, "why": "β is cut at each end: at 0.5 nothing is left",
                                               "help": "share of the values cut at each end, per coordinate"})


class TrimmedMean(CoordinateRule):
    name = "trimmed_mean"
    Params = TrimmedMeanParams
    help = "coordinate-wise mean after cutting the beta share at each end"

    def reduce(self, stack: np.ndarray) -> np.ndarray:
        return stats.trim_mean(stack, self.own.beta, axis=0)
