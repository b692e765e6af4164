"""Krum and Multi-Krum (Blanchard et al. 2017, "Machine learning with adversaries: Byzantine tolerant
gradient descent"), as Flower 1.41 computes them (``flwr.serverapp.strategy.Krum`` / ``MultiKrum``,
``multikrum.select_multikrum``)::

    d_ij   = ‖θ_i − θ_j‖²₂                        squared distances between the K received models
    s(i)   = Σ_{j ∈ N_i} d_ij                     N_i: the n − f − 2 models closest to θ_i (itself
                                                  excluded); Flower takes max(1, K − f − 2) of them
    S      = the m models with the lowest s(i)    m = ``num_nodes_to_select`` (1: Krum)
    θ      = Σ_{k ∈ S} n_k θ_k / Σ_{k ∈ S} n_k   the kept models, weighted by their example counts

The kept models are averaged **weighted by examples**, as Flower's MultiKrum does
(``aggregate_arrayrecords(replies_to_aggregate, weighted_by_key)``), so the rule is FedAvg over the
selection: α_k = n_k / Σ_S n_j for a kept model, 0 for the others (the weights logged as
``agg_weight`` show which hospitals were kept). With m = 1 (Krum) the result is the selected model.

Defaults are Flower's: f = ``num_malicious_nodes`` = 0, m = ``num_nodes_to_select`` = 1. Where this
differs from Flower:

* distances run over the keys simlab measures every distance on (the trainable parameters, plus the
  normalisation buffers with ``include_buffers``; never integer counters), where Flower flattens
  every array of the record; they are summed key by key in float64 from the differences, not through
  ‖x‖² + ‖y‖² − 2x·y;
* ties in s(i) are broken by client id (a stable sort over the id-sorted models), so the result does
  not depend on arrival order;
* Blanchard et al.'s guarantee needs 2f + 2 < n. With f > 0 and fewer than 2f + 3 accepted updates
  the round is refused (:class:`EmptyAggregation`, the caller skips it) instead of silently taking
  max(1, K − f − 2) neighbours as Flower does; with f = 0 any K ≥ 1 is accepted, as in Flower (K ≤ 2:
  one neighbour or none). m larger than K keeps all K (Flower's ``argsort(scores)[:m]``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from simlab.aggregation.core import EmptyAggregation, WeightingRule, distances_to_mean


@dataclass(frozen=True)
class KrumParams:
    num_malicious_nodes: int = field(default=0, metadata={
        "ge": 0, "le": 1000, "why": "f > 0 needs 2f + 3 updates per round and Krum compares every pair: f = 1,000 means "
                                    "2,003 hospitals and two million model distances per round",
        "help": "f, the number of Byzantine hospitals tolerated (Flower's num_malicious_nodes); "
                         "f > 0 needs at least 2f + 3 accepted updates per aggregation"})
    num_nodes_to_select: int = field(default=1, metadata={
        "ge": 1, "le": 10_000, "why": "m beyond a round's updates keeps them all; 10,000 is more hospitals than a "
                                      "round of one federation sends",
        "help": "m, the number of lowest-score models kept and averaged by examples "
                         "(Flower's num_nodes_to_select; 1: Krum, > 1: Multi-Krum)"})


def pairwise_sq_distances(models, keys) -> np.ndarray:
    """(K, K) float64 matrix of ‖θ_i − θ_j‖²₂ over ``keys``."""
    K = len(models)
    d = np.zeros((K, K), dtype=np.float64)
    for k in keys:
        stack = np.stack([np.asarray(m[k], dtype=np.float64).ravel() for m in models])  # (K, P)
        for i in range(K):
            diff = stack - stack[i]
            d[i] += np.einsum("kp,kp->k", diff, diff)
    return d


def krum_scores(sq: np.ndarray, f: int) -> np.ndarray:
    """s(i): the sum of the max(1, K − f − 2) smallest d_ij, j ≠ i (as Flower: the sorted row without
    its first entry, the model itself)."""
    K = len(sq)
    closest = max(1, K - f - 2)
    return np.asarray([np.sort(np.delete(row, i))[:closest].sum() for i, row in enumerate(sq)], dtype=np.float64)


def krum_select(models, keys, f: int, m: int) -> np.ndarray:
    """Indices of the kept models (lowest scores first; ties by position)."""
    K = len(models)
    if f > 0 and K < 2 * f + 3:
        raise EmptyAggregation(f"krum with num_malicious_nodes f={f} needs at least 2f+3 = {2 * f + 3} "
                               f"accepted updates (Blanchard et al.: 2f + 2 < n), got {K}")
    scores = krum_scores(pairwise_sq_distances(models, keys), f)
    return np.argsort(scores, kind="stable")[:m]


class Krum(WeightingRule):
    name = "krum"
    Params = KrumParams
    help = "Krum / Multi-Krum: keep the m models closest to their K−f−2 neighbours, averaged ∝ n_k"

    def weights(self, models, counts, dist_keys):
        kept = krum_select(models, dist_keys, self.own.num_malicious_nodes, self.own.num_nodes_to_select)
        weights = np.zeros(len(models), dtype=np.float64)
        total = float(sum(counts[i] for i in kept))
        for i in kept:
            weights[i] = counts[i] / total
        return weights, distances_to_mean(models, dist_keys)
