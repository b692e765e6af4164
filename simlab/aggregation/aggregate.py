"""One round's aggregation: screen the updates, then let the configured rule combine the rest."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from simlab.aggregation.core import AggregateResult, EmptyAggregation, check_update, distance_keys
from simlab.aggregation.registry import make_rule


def aggregate(
    entries: Iterable[tuple[str, Mapping[str, np.ndarray], int]],
    params,
    trainable_keys: set[str] | None = None,
    reference: Mapping[str, np.ndarray] | None = None,
) -> AggregateResult:
    """Combine ``(client_id, model, num_examples)`` entries with the rule ``params.rule``.

    ``trainable_keys``: names of the trainable parameters (distances and the update norm use them,
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
    accepted, rejected = _screen(entries, params, trainable_keys, reference)
    models = [m for _, m, _ in accepted]
    counts = [n for _, _, n in accepted]
    _same_arrays(accepted)
    dist_keys = distance_keys(models[0], trainable_keys, params.include_buffers)
    out, weights, distances = make_rule(params).combine(models, counts, dist_keys)
    cids = [c for c, _, _ in accepted]
    return AggregateResult(
        model=out,
        weights={} if weights is None else {c: float(w) for c, w in zip(cids, weights)},
        distances={c: float(d) for c, d in zip(cids, distances)},
        rejected=rejected,
        num_examples=int(sum(counts)),
    )


def _screen(entries, params, trainable_keys, reference) -> tuple[list, dict[str, str]]:
    """(accepted (id, arrays, n) sorted by client id, rejected id → reason); raises EmptyAggregation."""
    items = sorted(((str(cid), m, n) for cid, m, n in entries), key=lambda e: e[0])
    ids = [cid for cid, _, _ in items]
    dupes = sorted({c for c in ids if ids.count(c) > 1})
    if dupes:
        raise ValueError(f"duplicate client ids: {', '.join(dupes)}")
    norm_keys = None
    if params.max_update_norm is not None:
        norm_keys = distance_keys(reference, trainable_keys, params.include_buffers)
    rejected: dict[str, str] = {}
    accepted: list[tuple[str, dict[str, np.ndarray], int]] = []
    for cid, m, n in items:
        if isinstance(n, bool) or int(n) != n or n < 0:
            raise ValueError(f"num_examples of client {cid} must be an integer ≥ 0, found {n!r}")
        arrays = {k: np.asarray(v) for k, v in m.items()}
        reason = ("num_examples = 0: nothing was trained" if int(n) == 0
                  else check_update(arrays, reference, params.max_update_norm, keys=norm_keys))
        if reason is not None:
            rejected[cid] = reason
        else:
            accepted.append((cid, arrays, int(n)))
    if not accepted:
        detail = "; ".join(f"{c}: {r}" for c, r in rejected.items()) or "no updates received"
        raise EmptyAggregation(f"no update left to aggregate ({detail})", rejected)
    return accepted, rejected


def _same_arrays(accepted: list) -> None:
    """Every accepted model has the first one's keys, shapes and dtypes (a caller error otherwise)."""
    (c0, first, _), rest = accepted[0], accepted[1:]
    for cid, m, _ in rest:
        if set(m) != set(first):
            raise ValueError(f"client {cid} sends keys that differ from client {c0}")
        for k, a in first.items():
            if m[k].shape != a.shape or m[k].dtype != a.dtype:
                raise ValueError(f"'{k}' of client {cid} is {m[k].dtype}{m[k].shape}, client {c0} sends {a.dtype}{a.shape}")
