"""Conversions between simlab's plain data and Flower's records (the only place that knows both)."""

from __future__ import annotations

import json

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

from simlab.config import to_plain
from simlab.scenario.schema import Scenario


def to_array_record(state: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


def from_array_record(record: ArrayRecord, like: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Arrays back from a record. Transport may turn 0-d arrays (BatchNorm's num_batches_tracked) into
    shape (1,); with ``like`` every array is given back the reference's shape (same size required)."""
    out = {k: v.numpy() for k, v in record.items()}
    if like is not None:
        for k, ref in like.items():
            if k in out and out[k].shape != ref.shape and out[k].size == ref.size:
                out[k] = out[k].reshape(ref.shape)
    return out


def state_nbytes(state: dict[str, np.ndarray]) -> int:
    return int(sum(v.nbytes for v in state.values()))


def hospital_part(scenario: Scenario, hospital_id: str) -> str:
    """The part of the scenario one hospital needs, as JSON: its own stream, the domains it reads or is
    tested on, and the training settings. Other hospitals and the arm list are left out."""
    plain = to_plain(scenario)
    hospital = next(h for h in plain["hospitals"] if h["id"] == hospital_id)
    spec = next(h for h in scenario.hospitals if h.id == hospital_id)
    wanted = set(spec.drift.referenced_domains()) | set(scenario.eval_domains)
    plain["hospitals"] = [hospital]
    plain["domains"] = {k: v for k, v in plain["domains"].items() if k in wanted}
    plain["evaluation"]["domains"] = list(scenario.eval_domains)
    plain.pop("arms")
    plain.pop("output")
    return json.dumps(plain, sort_keys=True)


def config(**values) -> ConfigRecord:
    return ConfigRecord(values)


def metrics(values: dict[str, float]) -> MetricRecord:
    return MetricRecord({k: float(v) for k, v in values.items()})


def pack_histories(histories: dict[int, list]) -> dict[str, ArrayRecord]:
    """ODEx member histories (entries carry their first block) as few records: entries whose arrays
    have the same names, shapes and dtypes (normally all of them) go into one record ``hist.<j>``
    holding each array stacked over the entries, with ``member`` and ``index`` (position in the
    member's history). A record costs per array, not per byte, when it is built and read, so this
    stays cheap while histories grow to hundreds of entries."""
    groups: dict[tuple, list[tuple[int, int, dict[str, np.ndarray]]]] = {}
    for m, entries in histories.items():
        for i, e in enumerate(entries):
            arrays = e.to_arrays()
            signature = tuple((k, v.shape, v.dtype.str) for k, v in arrays.items())
            groups.setdefault(signature, []).append((m, i, arrays))
    out = {}
    for j, group in enumerate(groups.values()):
        stacked = {k: np.stack([arrays[k] for *_, arrays in group]) for k in group[0][2]}
        stacked["member"] = np.array([m for m, *_ in group], dtype=np.int64)
        stacked["index"] = np.array([i for _, i, _ in group], dtype=np.int64)
        out[f"hist.{j}"] = to_array_record(stacked)
    return out


def unpack_histories(content) -> dict[int, list]:
    """The histories :func:`pack_histories` packed, member → entries in history order."""
    from simlab.continual.odex import Entry

    found: dict[int, dict[int, object]] = {}
    for key, record in content.array_records.items():
        if not key.startswith("hist."):
            continue
        arrays = from_array_record(record)
        members, index = arrays.pop("member"), arrays.pop("index")
        for j, (m, i) in enumerate(zip(members.tolist(), index.tolist())):
            found.setdefault(m, {})[i] = Entry.from_arrays({k: v[j] for k, v in arrays.items()})
    return {m: [entries[i] for i in sorted(entries)] for m, entries in sorted(found.items())}


def records_nbytes(records: dict[str, ArrayRecord]) -> int:
    return int(sum(v.numpy().nbytes for r in records.values() for v in r.values()))
