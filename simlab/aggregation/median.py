"""Coordinate-wise median (Yin et al. 2018, "Byzantine-robust distributed learning"): every
coordinate of the new model is the median of that coordinate over the K accepted models
(``np.median``: the mean of the two middle values when K is even). Example counts are ignored.

Flower 1.41 ships the same statistic in ``flwr.serverapp.strategy.FedMedian``; it is not called here
because this package is the Flower-free core (the ODEx pool aggregates each member with the same rules
and runs without Flower) and Flower's version works on a strategy's messages, not on arrays.
``tests/test_aggregation.py`` checks that both give the same numbers.
"""

from __future__ import annotations

import numpy as np

from simlab.aggregation.core import CoordinateRule


class Median(CoordinateRule):
    name = "median"
    help = "coordinate-wise median of the models"

    def reduce(self, stack: np.ndarray) -> np.ndarray:
        return np.median(stack, axis=0)
