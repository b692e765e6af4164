"""The rule-independent half of server-side aggregation, on plain numpy models.

A *model* is a ``dict[str, np.ndarray]``: a torch ``state_dict`` converted to numpy, so it holds the
trainable parameters, the normalisation buffers (``running_mean``/``running_var``, floating) and the
integer counters (``num_batches_tracked``, int64, 0-d). This package is pure numpy; the Flower server
and the ODEx pool call it with arrays they have already unpacked.

A rule (:class:`Rule`, one file per rule, registered in :mod:`simlab.aggregation.registry`) only says
how K accepted models become one. Everything else is shared and lives here:

- **Update checks** (:func:`check_update`): an update with NaN/Inf values, a structure that differs
  from the global model, or (optionally) an update norm ‖θ_k − θ_global‖ above ``max_update_norm`` is
  excluded and reported in ``AggregateResult.rejected``. A client that reports zero training examples
  is excluded too (it trained nothing). If no update is left, :class:`EmptyAggregation` is raised and
  the caller skips the round: an aggregate is never produced from nothing.
- **Order independence**: entries are sorted by client id before any arithmetic, so the result
  (weights and every array, bit for bit) does not depend on the order in which updates arrived.
- **Integer arrays** (``num_batches_tracked``) take the element-wise maximum over the accepted
  clients, whatever the rule: a mean or median of a counter is meaningless, and the maximum keeps
  BatchNorm's momentum schedule (which only depends on the counter when ``momentum=None``) monotone.
- **Distances** d_k = ‖θ_k − θ̄‖₂ to the plain mean are reported for every rule (monitoring); which
  arrays form θ: the trainable parameters by default, plus the normalisation buffers with
  ``include_buffers``. Integer arrays never enter distances or norms.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

Model = dict[str, np.ndarray]


class EmptyAggregation(RuntimeError):
    """No update survived the checks; the caller skips the round. ``rejected``: client id → reason."""

    def __init__(self, message: str, rejected: Mapping[str, str] | None = None):
        super().__init__(message)
        self.rejected: dict[str, str] = dict(rejected or {})


@dataclass
class AggregateResult:
    """Outcome of :func:`simlab.aggregation.aggregate`.

    ``model``: the new global model (same keys, key order, shapes and dtypes as the inputs).
    ``weights``: accepted client id → α_k (sum 1) for a weighting rule; empty for a rule that is not a
    weighting (median, trimmed mean). ``distances``: accepted client id → d_k = ‖θ_k − θ̄‖₂ over the
    distance keys (every rule, for monitoring). ``rejected``: client id → reason. ``num_examples``:
    Σ n_k over the accepted clients.
    """

    model: Model
    weights: dict[str, float]
    distances: dict[str, float]
    rejected: dict[str, str]
    num_examples: int


def is_float(a: np.ndarray) -> bool:
    return np.issubdtype(a.dtype, np.floating)


def is_int_like(a: np.ndarray) -> bool:
    return np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_


def model_nbytes(model: Mapping[str, np.ndarray]) -> int:
    """Bytes of the raw array data in ``model`` (Σ size·itemsize; no container or header overhead)."""
    return int(sum(np.asarray(a).nbytes for a in model.values()))


def update_norm(
    model: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray] | None = None,
    keys: Iterable[str] | None = None,
) -> float:
    """‖θ − θ_ref‖₂ over the flattened float64 vector of ``keys`` (default: every floating key of ``model``).

    Without ``reference`` the model itself is taken as the update (norm of θ).
    """
    model = {k: np.asarray(v) for k, v in model.items()}
    keys = [k for k in model if is_float(model[k])] if keys is None else list(keys)
    total = 0.0
    for k in keys:
        x = model[k].astype(np.float64)
        if reference is not None:
            x = x - np.asarray(reference[k]).astype(np.float64)
        total += float(np.dot(x.ravel(), x.ravel()))
    return math.sqrt(total)


def check_update(
    model: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray] | None = None,
    max_norm: float | None = None,
    keys: Iterable[str] | None = None,
) -> str | None:
    """Return why ``model`` must not be aggregated, or None when it is fine.

    Checks, in this order (the first failure is reported):

    1. with ``reference``: same key set, and per key the same shape and dtype;
    2. every floating array is finite (the reason names the key and counts NaN and Inf);
    3. with ``max_norm``: ‖θ − θ_ref‖₂ ≤ max_norm over ``keys`` (default: all floating keys). Without a
       reference the model itself is the update (useful when clients send deltas).
    """
    arrays = {k: np.asarray(v) for k, v in model.items()}
    if reference is not None:
        missing = sorted(set(reference) - set(arrays))
        extra = sorted(set(arrays) - set(reference))
        if missing:
            return f"missing keys: {', '.join(missing)}"
        if extra:
            return f"unexpected keys: {', '.join(extra)}"
        for k in reference:
            ref = np.asarray(reference[k])
            a = arrays[k]
            if a.shape != ref.shape:
                return f"shape of '{k}' is {a.shape}, expected {ref.shape}"
            if a.dtype != ref.dtype:
                return f"dtype of '{k}' is {a.dtype}, expected {ref.dtype}"
    for k, a in arrays.items():
        if is_float(a):
            finite = np.isfinite(a)
            if not finite.all():
                n_nan = int(np.isnan(a).sum())
                n_inf = int(a.size - finite.sum()) - n_nan
                return f"non-finite values in '{k}' ({n_nan} NaN, {n_inf} Inf)"
        elif not is_int_like(a):
            return f"unsupported dtype {a.dtype} in '{k}'"
    if max_norm is not None:
        norm = update_norm(arrays, reference, keys)
        if not norm <= max_norm:
            return f"update norm {norm:.6g} exceeds max_update_norm {max_norm:.6g}"
    return None


def check_same_structure(models: Sequence[Mapping[str, np.ndarray]], keys: Iterable[str]) -> None:
    first = models[0]
    for i, m in enumerate(models[1:], start=1):
        for k in keys:
            if k not in m:
                raise ValueError(f"model {i} has no key '{k}'")
            if np.shape(m[k]) != np.shape(first[k]):
                raise ValueError(
                    f"shape of '{k}' differs between models: {np.shape(m[k])} vs {np.shape(first[k])}"
                )


def distances_to_mean(models: Sequence[Mapping[str, np.ndarray]], keys: Iterable[str]) -> np.ndarray:
    """d_k = ‖θ_k − θ̄‖₂ (shape (K,), float64), θ̄ the plain mean of the K models, over ``keys``."""
    sq = np.zeros(len(models), dtype=np.float64)
    for k in keys:
        stack = np.stack([np.asarray(m[k], dtype=np.float64).ravel() for m in models])  # (K, P)
        diff = stack - stack.mean(axis=0)
        sq += np.einsum("kp,kp->k", diff, diff)
    distances = np.sqrt(sq)
    if not np.isfinite(distances).all():
        raise ValueError("non-finite distance: check the updates (check_update) before weighting")
    return distances


def max_of_counters(models: Sequence[Mapping[str, np.ndarray]], k: str, a: np.ndarray) -> np.ndarray:
    """Integer array ``k``: the element-wise maximum over the models (see the module docstring)."""
    # np.array(...) turns the numpy scalar of a 0-d reduction back into a 0-d array.
    return np.array(np.stack([m[k] for m in models]).max(axis=0), dtype=a.dtype)


class Rule:
    """How the accepted models of one round become one model.

    Subclasses set ``name`` (the scenario's ``federation.aggregation.rule``), optionally ``Params`` (a
    frozen dataclass, read from ``federation.aggregation.<name>``), and implement :meth:`combine`.
    ``params`` is the whole :class:`AggregationParams`; ``own`` is this rule's section (or None).
    """

    name: ClassVar[str]
    Params: ClassVar[type | None] = None
    help: ClassVar[str] = ""

    def __init__(self, params, own=None):
        self.params = params
        self.own = own

    def combine(self, models: list[Model], counts: list[int], dist_keys: list[str]
                ) -> tuple[Model, np.ndarray | None, np.ndarray]:
        """(combined model, weights α_k or None when the rule is not a weighting, distances d_k)."""
        raise NotImplementedError


class WeightingRule(Rule):
    """θ = Σ_k α_k θ_k per floating array, computed in float64 and cast back to the input dtype."""

    def weights(self, models: list[Model], counts: list[int], dist_keys: list[str]
                ) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def combine(self, models, counts, dist_keys):
        weights, distances = self.weights(models, counts, dist_keys)
        out: Model = {}
        for k, a in models[0].items():
            if is_float(a):
                acc = np.zeros(a.shape, dtype=np.float64)
                for w, m in zip(weights, models):
                    acc += w * m[k].astype(np.float64)
                out[k] = acc.astype(a.dtype)
            else:
                out[k] = max_of_counters(models, k, a)
        return out, weights, distances


class CoordinateRule(Rule):
    """A statistic taken coordinate by coordinate over the K models (no weights): :meth:`reduce` gets
    the (K, ...) float64 stack of one floating array and returns the combined array."""

    def reduce(self, stack: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def combine(self, models, counts, dist_keys):
        check_same_structure(models, dist_keys)
        out: Model = {}
        for k, a in models[0].items():
            if is_float(a):
                out[k] = np.asarray(self.reduce(np.stack([m[k].astype(np.float64) for m in models]))).astype(a.dtype)
            else:
                out[k] = max_of_counters(models, k, a)
        return out, None, distances_to_mean(models, dist_keys)


def distance_keys(
    model: Mapping[str, np.ndarray], trainable_keys: set[str] | None, include_buffers: bool
) -> list[str]:
    """Keys whose values form θ for distances and update norms, in the model's key order."""
    floating = [k for k, v in model.items() if is_float(np.asarray(v))]
    if trainable_keys is None:
        return floating
    unknown = sorted(set(trainable_keys) - set(model))
    if unknown:
        raise ValueError(f"trainable keys not in the model: {', '.join(unknown)}")
    not_float = sorted(k for k in trainable_keys if not is_float(np.asarray(model[k])))
    if not_float:
        raise ValueError(f"trainable keys that are not floating arrays: {', '.join(not_float)}")
    if include_buffers:
        return floating
    return [k for k in floating if k in trainable_keys]
