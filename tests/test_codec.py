"""Conversions between simlab's data and Flower's records: ODEx histories travel stacked."""

from __future__ import annotations

import numpy as np
import pytest
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


def test_typed_messages_round_trip_through_records():
    from simlab.federated import codec

    rng = np.random.default_rng(3)
    model = {"w": rng.standard_normal((2, 3)).astype(np.float32), "n": np.array(4, dtype=np.int64)}
    hist = {0: [_entry(rng, 1)], 3: [_entry(rng, 2), _entry(rng, 3)]}
    train = codec.Train(5, '{"x": 1}', model, {"state-key": "k", "state-round": 4}, member=3, histories=hist,
                        bank={"h1": rng.standard_normal((2, 1, 3, 3)).astype(np.float32)}, want_entry=True)
    back = codec.decode_train(codec.encode(train))
    assert (back.round, back.task, back.state, back.member, back.want_entry) == (5, '{"x": 1}', train.state, 3, True)
    assert all(back.model[k].tobytes() == model[k].tobytes() for k in model)
    assert list(back.histories) == [0, 3] and back.bank["h1"].tobytes() == train.bank["h1"].tobytes()
    plain = codec.decode_train(codec.encode(codec.Train(1, "{}", model)))
    assert (plain.member, plain.histories, plain.bank, plain.want_entry, plain.state) == (None, None, None, False, {})
    assert codec.broadcast_nbytes(train) == (sum(v.nbytes for v in model.values()) + train.bank["h1"].nbytes
                                            + records_nbytes(pack_histories(hist)))

    entry = hist[3][0]
    fb = entry.first_block
    reply = codec.TrainReply(model, {"train_loss": 0.5, "num_examples": 8.0}, entry, {"m0": [0.1], "member": 0})
    content = codec.encode(reply)
    assert not any(k.startswith("fb.") for k in codec.from_array_record(content["entry"]))  # the first block never travels up
    got = codec.decode_train_reply(content, like=model, first_block=fb)
    assert got.metrics["num-examples"] == 8.0 and got.shift["member"] == 0
    _assert_same_entry(got.entry, entry)
    assert codec.window_scores(got.shift) == {0: pytest.approx(np.array([0.1]))}

    members = {0: model, 2: {k: v + 1 for k, v in model.items()}}
    ev = codec.decode_evaluate(codec.encode(codec.Evaluate(7, "{}", members=members, histories=hist, oracle={"A": 2})))
    assert list(ev.members) == [0, 2] and ev.oracle == {"A": 2} and list(ev.histories) == [0, 3]
    assert codec.decode_evaluate(codec.encode(codec.Evaluate(7, "{}", model=model))).members is None
    assert codec.decode_evaluate(codec.encode(codec.Evaluate(7, "{}", model=model))).domains is None
    assert codec.decode_evaluate(codec.encode(codec.Evaluate(7, "{}", model=model, domains=["B"]))).domains == ["B"]
    with_bank = codec.Evaluate(7, "{}", model=model, bank=train.bank)  # a test-time adaptation that reads the bank
    got_bank = codec.decode_evaluate(codec.encode(with_bank)).bank
    assert got_bank["h1"].tobytes() == train.bank["h1"].tobytes()
    assert codec.broadcast_nbytes(with_bank) == sum(v.nbytes for v in model.values()) + train.bank["h1"].nbytes
    assert codec.decode_evaluate(codec.encode(codec.Evaluate(7, "{}", model=model))).bank is None
    pool = codec.Evaluate(7, "{}", members=members, histories=hist, oracle={}, domains=["A", "C"])
    assert codec.decode_evaluate(codec.encode(pool)).domains == ["A", "C"]


def test_a_record_travels_as_one_packed_array_and_comes_back_bit_for_bit():
    """One Flower object per record, not per array (a deployment moves each object in a request of
    its own); names, order, dtypes (byte order too), shapes (0-d and empty too) and bits kept."""
    import pickle

    from flwr.app import Array, ArrayRecord

    from simlab.federated import codec

    rng = np.random.default_rng(5)
    state = {"w": rng.standard_normal((4, 3, 3)).astype(np.float32),
             "t": rng.standard_normal((3, 5)).T,  # not C-contiguous, float64
             "be": rng.standard_normal(4).astype(">f4"),  # byte order kept
             "n": np.array(7, dtype=np.int64),  # 0-d, like BatchNorm's num_batches_tracked
             "mask": rng.random(6) > 0.5, "empty": np.zeros((0, 2), np.float32), "ä/name.with dots": np.ones(2)}
    record = codec.to_array_record(state)
    assert list(record) == [codec.PACKED] and record[codec.PACKED].stype == codec.PACKED
    for back in (codec.from_array_record(record), codec.from_array_record(record, like=state),
                 codec.from_array_record(pickle.loads(pickle.dumps(record)))):
        assert list(back) == list(state)
        for k, v in state.items():
            assert (back[k].dtype, back[k].shape) == (v.dtype, v.shape)
            assert back[k].tobytes() == np.ascontiguousarray(v).tobytes()
            assert back[k].flags.writeable and back[k].flags.c_contiguous and not np.shares_memory(back[k], v)
    assert codec.records_nbytes({"r": record}) == sum(v.nbytes for v in state.values())  # headers not counted
    assert codec.from_array_record(codec.to_array_record({})) == {}
    # records of one Array per name still read: simlab's earlier RAW arrays and Flower's .npy format
    for per_name in (ArrayRecord({k: codec.to_array(v) for k, v in state.items()}),
                     ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})):
        back = codec.from_array_record(per_name, like=state)
        assert all(back[k].tobytes() == np.ascontiguousarray(v).tobytes() and back[k].shape == v.shape
                   for k, v in state.items())
        assert codec.records_nbytes({"r": per_name}) == codec.records_nbytes({"r": record})


def test_encoder_converts_a_shared_model_once_per_broadcast():
    from simlab.federated import codec

    model = {"w": np.ones(3, np.float32)}
    enc = codec.Encoder()
    a = codec.encode(codec.Train(1, "{}", model), enc)
    b = codec.encode(codec.Train(1, "{}", model), enc)
    assert a["arrays"] is b["arrays"]
    assert codec.encode(codec.Train(1, "{}", model))["arrays"] is not a["arrays"]
