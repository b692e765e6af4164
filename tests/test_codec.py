"""Conversions between simlab's data and Flower's records: ODEx histories travel stacked."""

from __future__ import annotations

import numpy as np
from flwr.app import RecordDict

from simlab.continual.mahalanobis import ShiftParams
from simlab.continual.odex import Entry, fit_entry
from simlab.federated.codec import pack_histories, records_nbytes, unpack_histories


def _entry(rng: np.random.Generator, t: int, channels: int = 4, distance: str = "squared") -> Entry:
    fb = {"conv.weight": rng.standard_normal((channels, 1, 3, 3)).astype(np.float32),
          "conv.bias": rng.standard_normal(channels).astype(np.float32)}
    z = rng.standard_normal((30, 6)) + t
    return fit_entry(z, fb, ShiftParams(distance=distance), t)


def _assert_same_entry(a: Entry, b: Entry) -> None:
    arrays_a, arrays_b = a.to_arrays(), b.to_arrays()
    assert arrays_a.keys() == arrays_b.keys()
    for k in arrays_a:
        assert arrays_a[k].dtype == arrays_b[k].dtype
        np.testing.assert_array_equal(arrays_a[k], arrays_b[k])


def test_histories_round_trip_exactly_in_few_records():
    rng = np.random.default_rng(0)
    histories = {0: [_entry(rng, 1), _entry(rng, 2), _entry(rng, 3)],
                 2: [_entry(rng, 2), _entry(rng, 4, channels=8)],  # another first-block shape
                 5: [_entry(rng, 3, distance="root")]}  # another calibration kind
    records = pack_histories(histories)
    assert len(records) == 3  # one record per shape signature, not one per entry
    n_entries = sum(len(h) for h in histories.values())
    payload = sum(v.nbytes for h in histories.values() for e in h for v in e.to_arrays().values())
    assert records_nbytes(records) == payload + 2 * 8 * n_entries  # plus member and index per entry
    back = unpack_histories(RecordDict(records))
    assert list(back) == [0, 2, 5]
    for m, entries in histories.items():
        assert [e.round for e in back[m]] == [e.round for e in entries]  # history order kept
        for a, b in zip(entries, back[m]):
            _assert_same_entry(a, b)
    assert unpack_histories(RecordDict({})) == {}
    assert pack_histories({}) == {}
