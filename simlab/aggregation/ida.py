"""Inverse-distance aggregation (IDA, Yeganeh et al. 2020), alone and combined with FedAvg.

* ``ida``::

      θ̄   = (1/K) Σ_k θ_k                 plain mean of the K received models
      d_k  = ‖θ_k − θ̄‖₂                    over the whole flattened parameter vector, in float64
      α_k  ∝ 1 / max(d_k, ε)               normalised to sum 1

  A model far from the others (over-fitted, corrupted, poisoned) gets a small weight. With K = 2 both
  models are equally far from their mean, so IDA reduces to the plain mean.
* ``ida_fedavg``: α_k ∝ n_k / max(d_k, ε), normalised (IDA combined with the FedAvg data fraction).

Zero distance is not handled by the paper. Here: if every d_k < ε (all models coincide, or K = 1) the
rule falls back to the plain weights (uniform for ``ida``, ∝ n_k for ``ida_fedavg``); if only some
d_k < ε, the clamp ε bounds their weight (they dominate, as the inverse distance says they should).
θ is the trainable parameters by default (the paper speaks of "model parameters"); normalisation
buffers are added with ``include_buffers``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from simlab.aggregation.core import WeightingRule, check_same_structure, distances_to_mean, is_float


def ida_weights(
    models: Sequence[Mapping[str, np.ndarray]],
    num_examples: Sequence[int] | None = None,
    keys: Iterable[str] | None = None,
    eps: float = 1e-12,
) -> tuple[np.ndarray, np.ndarray]:
    """Inverse-distance weights α (shape (K,), sum 1) and distances d (shape (K,)), both float64.

    θ̄ = plain mean of the K models over ``keys`` (default: the floating keys of the first model);
    d_k = ‖θ_k − θ̄‖₂ over the flattened float64 vector; α_k ∝ 1/max(d_k, ε), times n_k when
    ``num_examples`` is given (IDA+FedAvg). If every d_k < ε the plain weights are returned
    (uniform, or ∝ n_k). The weights follow the order of ``models``.
    """
    K = len(models)
    if K == 0:
        raise ValueError("ida_weights needs at least one model")
    if not eps > 0.0:
        raise ValueError(f"eps must be > 0, found {eps!r}")
    keys = [k for k, v in models[0].items() if is_float(np.asarray(v))] if keys is None else list(keys)
    check_same_structure(models, keys)
    if num_examples is not None:
        n = np.asarray(num_examples, dtype=np.float64)
        if n.shape != (K,):
            raise ValueError(f"num_examples has {n.size} entries for {K} models")
        if (n < 0).any() or not np.isfinite(n).all() or n.sum() <= 0:
            raise ValueError(f"num_examples must be ≥ 0 with a positive sum, found {list(num_examples)}")
    else:
        n = np.ones(K, dtype=np.float64)
    distances = distances_to_mean(models, keys)
    raw = n.copy() if (distances < eps).all() else n / np.maximum(distances, eps)
    return raw / raw.sum(), distances


class Ida(WeightingRule):
    name = "ida"
    help = "weights ∝ 1/‖θ_k − θ̄‖"

    def weights(self, models, counts, dist_keys):
        return ida_weights(models, None, dist_keys, self.params.eps)


class IdaFedAvg(WeightingRule):
    name = "ida_fedavg"
    help = "weights ∝ n_k/‖θ_k − θ̄‖"

    def weights(self, models, counts, dist_keys):
        return ida_weights(models, counts, dist_keys, self.params.eps)
