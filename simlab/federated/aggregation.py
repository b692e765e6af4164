"""Server-side aggregation rules on plain numpy models: FedAvg and inverse-distance aggregation.

A *model* is a ``dict[str, np.ndarray]``: a torch ``state_dict`` converted to numpy, so it holds the
trainable parameters, the normalisation buffers (``running_mean``/``running_var``, floating) and the
integer counters (``num_batches_tracked``, int64, 0-d). This module is pure numpy; the Flower server
calls it with arrays it has already unpacked.

Rules (the weight of client k is α_k, Σ_k α_k = 1):

* ``fedavg`` (McMahan et al. 2017): α_k = n_k / Σ_j n_j, n_k = number of local training examples.
* ``ida`` (inverse distance aggregation, Yeganeh et al. 2020)::

      θ̄   = (1/K) Σ_k θ_k                 plain mean of the K received models
      d_k  = ‖θ_k − θ̄‖₂                    over the whole flattened parameter vector, in float64
      α_k  ∝ 1 / max(d_k, ε)               normalised to sum 1

  A model far from the others (over-fitted, corrupted, poisoned) gets a small weight. With K = 2 both
  models are equally far from their mean, so IDA reduces to the plain mean.
* ``ida_fedavg``: α_k ∝ n_k / max(d_k, ε), normalised (IDA combined with the FedAvg data fraction).

Zero distance is not handled by the paper. Here: if every d_k < ε (all models coincide, or K = 1) the
rule falls back to the plain weights (uniform for ``ida``, ∝ n_k for ``ida_fedavg``); if only some
d_k < ε, the clamp ε bounds their weight (they dominate, as the inverse distance says they should).

Which arrays define θ for the distances: the trainable parameters by default (the paper speaks of
"model parameters"); normalisation buffers are added with ``include_buffers=True``. Integer arrays
never enter distances or norms.

Combining (all rules): each floating array is the weighted sum Σ_k α_k θ_k computed in float64, then cast
back to the input dtype. Integer arrays (``num_batches_tracked``) take the element-wise maximum over the
accepted clients: a weighted mean of a counter is meaningless, and the maximum keeps BatchNorm's
momentum schedule (which only depends on the counter when ``momentum=None``) monotone.

Order independence: entries are sorted by client id before any arithmetic, so the result (weights and
every array, bit for bit) does not depend on the order in which the updates arrived.

Update checks: before weighting, every update goes through :func:`check_update`; an update with NaN/Inf
values, a structure that differs from the global model, or (optionally) an update norm
‖θ_k − θ_global‖ above ``max_update_norm`` is excluded and reported in ``AggregateResult.rejected``.
A client that reports zero training examples is excluded too (it trained nothing). If no update is
left, :class:`EmptyAggregation` is raised and the caller skips the round: an aggregate is never
produced from nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Model = dict[str, np.ndarray]

__all__ = [
    "AggregateResult",
    "AggregationParams",
    "EmptyAggregation",
    "aggregate",
    "check_update",
    "ida_weights",
    "model_nbytes",
    "update_norm",
]

RULES = ("fedavg", "ida", "ida_fedavg")


@dataclass(frozen=True)
class AggregationParams:
    """How the server combines the client models of one round (see the module docstring)."""

    rule: Literal["fedavg", "ida", "ida_fedavg"] = field(
        default="fedavg",
        metadata={"help": "fedavg: weights ∝ n_k; ida: ∝ 1/‖θ_k − θ̄‖; ida_fedavg: ∝ n_k/‖θ_k − θ̄‖"},
    )
    include_buffers: bool = field(
        default=False,
        metadata={"help": "IDA distances also over normalisation buffers (running mean/var), not only trainable parameters"},
    )
    eps: float = field(
        default=1e-12,
        metadata={"gt": 0.0, "help": "distance floor ε in 1/max(d_k, ε); all d_k < ε falls back to plain weights"},
    )
    max_update_norm: float | None = field(
        default=None,
        metadata={"gt": 0.0, "help": "reject a client whose ‖θ_k − θ_global‖₂ exceeds this (None: no limit)"},
    )

    def check(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        if self.rule not in RULES:
            problems.append(("rule", f"unknown rule {self.rule!r} (known: {', '.join(RULES)})"))
        if not (math.isfinite(self.eps) and self.eps > 0.0):
            problems.append(("eps", f"must be a finite number > 0, found {self.eps!r}"))
        if self.max_update_norm is not None and not (
            math.isfinite(self.max_update_norm) and self.max_update_norm > 0.0
        ):
            problems.append(
                ("max_update_norm", f"must be a finite number > 0 or null, found {self.max_update_norm!r}")
            )
        return problems


class EmptyAggregation(RuntimeError):
    """No update survived the checks; the caller skips the round. ``rejected``: client id → reason."""

    def __init__(self, message: str, rejected: Mapping[str, str] | None = None):
        super().__init__(message)
        self.rejected: dict[str, str] = dict(rejected or {})


@dataclass
class AggregateResult:
    """Outcome of :func:`aggregate`.

    ``model``: the new global model (same keys, key order, shapes and dtypes as the inputs).
    ``weights``: accepted client id → α_k (sum 1). ``distances``: accepted client id → d_k = ‖θ_k − θ̄‖₂
    over the distance keys (reported for every rule, for monitoring). ``rejected``: client id → reason.
    ``num_examples``: Σ n_k over the accepted clients.
    """

    model: Model
    weights: dict[str, float]
    distances: dict[str, float]
    rejected: dict[str, str]
    num_examples: int


def _is_float(a: np.ndarray) -> bool:
    return np.issubdtype(a.dtype, np.floating)


def _is_int_like(a: np.ndarray) -> bool:
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
    keys = [k for k in model if _is_float(model[k])] if keys is None else list(keys)
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
        if _is_float(a):
            finite = np.isfinite(a)
            if not finite.all():
                n_nan = int(np.isnan(a).sum())
                n_inf = int(a.size - finite.sum()) - n_nan
                return f"non-finite values in '{k}' ({n_nan} NaN, {n_inf} Inf)"
        elif not _is_int_like(a):
            return f"unsupported dtype {a.dtype} in '{k}'"
    if max_norm is not None:
        norm = update_norm(arrays, reference, keys)
        if not norm <= max_norm:
            return f"update norm {norm:.6g} exceeds max_update_norm {max_norm:.6g}"
    return None


def _check_same_structure(models: Sequence[Mapping[str, np.ndarray]], keys: Iterable[str]) -> None:
    first = models[0]
    for i, m in enumerate(models[1:], start=1):
        for k in keys:
            if k not in m:
                raise ValueError(f"model {i} has no key '{k}'")
            if np.shape(m[k]) != np.shape(first[k]):
                raise ValueError(
                    f"shape of '{k}' differs between models: {np.shape(m[k])} vs {np.shape(first[k])}"
                )


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
    if keys is None:
        keys = [k for k, v in models[0].items() if _is_float(np.asarray(v))]
    else:
        keys = list(keys)
    _check_same_structure(models, keys)
    if num_examples is not None:
        n = np.asarray(num_examples, dtype=np.float64)
        if n.shape != (K,):
            raise ValueError(f"num_examples has {n.size} entries for {K} models")
        if (n < 0).any() or not np.isfinite(n).all() or n.sum() <= 0:
            raise ValueError(f"num_examples must be ≥ 0 with a positive sum, found {list(num_examples)}")
    else:
        n = np.ones(K, dtype=np.float64)

    sq = np.zeros(K, dtype=np.float64)
    for k in keys:
        stack = np.stack([np.asarray(m[k], dtype=np.float64).ravel() for m in models])  # (K, P)
        diff = stack - stack.mean(axis=0)
        sq += np.einsum("kp,kp->k", diff, diff)
    distances = np.sqrt(sq)
    if not np.isfinite(distances).all():
        raise ValueError("non-finite distance: check the updates (check_update) before weighting")

    if (distances < eps).all():
        raw = n.copy()
    else:
        raw = n / np.maximum(distances, eps)
    weights = raw / raw.sum()
    return weights, distances


def aggregate(
    entries: Iterable[tuple[str, Mapping[str, np.ndarray], int]],
    params: AggregationParams,
    trainable_keys: set[str] | None = None,
    reference: Mapping[str, np.ndarray] | None = None,
) -> AggregateResult:
    """Combine ``(client_id, model, num_examples)`` entries with ``params.rule``.

    ``trainable_keys``: names of the trainable parameters (IDA distances and the update norm use them,
    plus the remaining floating buffers when ``params.include_buffers``); None means every floating key.
    ``reference``: the global model the clients started from; with it, updates whose structure differs
    are rejected, and it is required when ``params.max_update_norm`` is set.

    Raises :class:`EmptyAggregation` when no entry survives the checks, ValueError on caller errors
    (duplicate client ids, negative example counts, accepted models of different structure).
    """
    problems = params.check()
    if problems:
        raise ValueError("; ".join(f"{name}: {msg}" for name, msg in problems))
    if params.max_update_norm is not None and reference is None:
        raise ValueError("max_update_norm needs the reference (global) model")

    items = sorted(((str(cid), m, n) for cid, m, n in entries), key=lambda e: e[0])
    ids = [cid for cid, _, _ in items]
    dupes = sorted({c for c in ids if ids.count(c) > 1})
    if dupes:
        raise ValueError(f"duplicate client ids: {', '.join(dupes)}")

    norm_keys = None
    if params.max_update_norm is not None:
        norm_keys = _distance_keys(reference, trainable_keys, params.include_buffers)
    rejected: dict[str, str] = {}
    accepted: list[tuple[str, dict[str, np.ndarray], int]] = []
    for cid, m, n in items:
        if isinstance(n, bool) or int(n) != n or n < 0:
            raise ValueError(f"num_examples of client {cid} must be an integer ≥ 0, found {n!r}")
        n = int(n)
        arrays = {k: np.asarray(v) for k, v in m.items()}
        if n == 0:
            rejected[cid] = "num_examples = 0: nothing was trained"
            continue
        reason = check_update(arrays, reference, params.max_update_norm, keys=norm_keys)
        if reason is not None:
            rejected[cid] = reason
            continue
        accepted.append((cid, arrays, n))

    if not accepted:
        detail = "; ".join(f"{c}: {r}" for c, r in rejected.items()) or "no updates received"
        raise EmptyAggregation(f"no update left to aggregate ({detail})", rejected)

    models = [m for _, m, _ in accepted]
    counts = [n for _, _, n in accepted]
    first = models[0]
    for i, m in enumerate(models[1:], start=1):
        if set(m) != set(first):
            raise ValueError(f"client {accepted[i][0]} sends keys that differ from client {accepted[0][0]}")
        for k, a in first.items():
            if m[k].shape != a.shape or m[k].dtype != a.dtype:
                raise ValueError(
                    f"'{k}' of client {accepted[i][0]} is {m[k].dtype}{m[k].shape}, "
                    f"client {accepted[0][0]} sends {a.dtype}{a.shape}"
                )

    dist_keys = _distance_keys(first, trainable_keys, params.include_buffers)
    if params.rule == "fedavg":
        _, distances = ida_weights(models, None, dist_keys, params.eps)
        total = float(sum(counts))
        weights = np.asarray([c / total for c in counts], dtype=np.float64)
    else:
        weights, distances = ida_weights(
            models, counts if params.rule == "ida_fedavg" else None, dist_keys, params.eps
        )

    out: Model = {}
    for k, a in first.items():
        if _is_float(a):
            acc = np.zeros(a.shape, dtype=np.float64)
            for w, m in zip(weights, models):
                acc += w * m[k].astype(np.float64)
            out[k] = acc.astype(a.dtype)
        elif _is_int_like(a):
            # np.array(...) turns the numpy scalar of a 0-d reduction back into a 0-d array.
            out[k] = np.array(np.stack([m[k] for m in models]).max(axis=0), dtype=a.dtype)
        else:
            raise ValueError(f"unsupported dtype {a.dtype} in '{k}'")

    cids = [c for c, _, _ in accepted]
    return AggregateResult(
        model=out,
        weights={c: float(w) for c, w in zip(cids, weights)},
        distances={c: float(d) for c, d in zip(cids, distances)},
        rejected=rejected,
        num_examples=int(sum(counts)),
    )


def _distance_keys(
    model: Mapping[str, np.ndarray], trainable_keys: set[str] | None, include_buffers: bool
) -> list[str]:
    """Keys whose values form θ for distances and update norms, in the model's key order."""
    floating = [k for k, v in model.items() if _is_float(np.asarray(v))]
    if trainable_keys is None:
        return floating
    unknown = sorted(set(trainable_keys) - set(model))
    if unknown:
        raise ValueError(f"trainable keys not in the model: {', '.join(unknown)}")
    not_float = sorted(k for k in trainable_keys if not _is_float(np.asarray(model[k])))
    if not_float:
        raise ValueError(f"trainable keys that are not floating arrays: {', '.join(not_float)}")
    if include_buffers:
        return floating
    return [k for k in floating if k in trainable_keys]
