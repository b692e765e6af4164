"""The wire format: the only module that knows Flower's record names and keys.

Every message between the server and a hospital is one of the typed requests and replies below;
:func:`encode` turns one into a Flower ``RecordDict`` and the ``decode_*`` functions turn a
``RecordDict`` back. Record names: ``config`` (a ConfigRecord), ``metrics`` (MetricRecord),
``arrays`` (the model), ``m<id>`` (pool members, evaluation), ``hist.<j>`` (ODEx histories, stacked),
``entry`` (a window's statistics), ``shift`` (a window's scores), ``bank`` (FedDG amplitude blocks).
``fb.`` is the prefix of an entry's first-block arrays, which never travel up: the server adds the
first block it sent.

Message kinds (Flower message types): ``query`` identify, ``query.inputs`` a hospital's check of its
own inputs (after identification), ``query.bank`` FedDG amplitudes, ``query.dice`` DiceEx's window
Dice, ``train``, ``evaluate``.

A model or history sent to many hospitals in one broadcast is converted once: pass the same
:class:`Encoder` to every :func:`encode` of the broadcast.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MessageType, MetricRecord, RecordDict

from simlab.continual.odex import Entry

State = dict[str, np.ndarray]

IDENTIFY, BANK, DICE = MessageType.QUERY, f"{MessageType.QUERY}.bank", f"{MessageType.QUERY}.dice"
INPUTS = f"{MessageType.QUERY}.inputs"
TRAIN, EVALUATE = MessageType.TRAIN, MessageType.EVALUATE

FIRST_BLOCK = "fb."


# ------------------------------------------------------------------------------ arrays
RAW = "simlab.raw"
"""``Array.stype`` of one array as its bytes: ``data`` is the array's bytes in C order, ``dtype`` its
numpy dtype string with byte order (``'<f4'``), ``shape`` its shape. Flower's own format
(``numpy.ndarray``) is a ``.npy`` file per array, whose header numpy parses with a Python literal parser
on every read: for a U-Net of 82 arrays that costs tens of milliseconds per model and message, against
well under one for the bytes. Records in either format are still read (:func:`from_array_record`)."""

PACKED = "simlab.packed"
"""``Array.stype`` of a whole record packed into one array, under the key :data:`PACKED`: ``data`` is an
8-byte little-endian header length, a JSON header ``[[name, dtype, shape], ...]`` and the arrays' bytes
in C order, one after the other. Flower moves every Array of a message as an object of its own: in a
deployment that is one HTTPS request per array and hop (a U-Net: 82 arrays, so some 250 requests per
hospital and round for the model alone, each costing the single SuperLink process its TLS and node
authentication work), where a packed record costs one. In simulation the objects stay in memory and
the bytes are the same."""


def to_array(v: np.ndarray) -> Array:
    v = np.ascontiguousarray(v)
    return Array(dtype=v.dtype.str, shape=tuple(int(n) for n in v.shape), stype=RAW, data=v.tobytes())


def array_numpy(a: Array) -> np.ndarray:
    """The array an :class:`~flwr.app.Array` holds (RAW or Flower's format), writable, owning its memory."""
    if a.stype != RAW:
        return a.numpy()
    return np.frombuffer(a.data, dtype=np.dtype(a.dtype)).reshape(a.shape).copy()


def _pack(state: State) -> Array:
    arrays = {k: np.asarray(v, order="C") for k, v in state.items()}  # ascontiguousarray makes 0-d 1-d
    header = json.dumps([[k, v.dtype.str, list(v.shape)] for k, v in arrays.items()]).encode()
    data = b"".join([len(header).to_bytes(8, "little"), header, *(v.tobytes() for v in arrays.values())])
    return Array(dtype="|u1", shape=(len(data),), stype=PACKED, data=data)


def _packed_header(a: Array) -> tuple[list, int]:
    """(header entries, offset of the first array's bytes) of a :data:`PACKED` array."""
    n = int.from_bytes(a.data[:8], "little")
    return json.loads(a.data[8:8 + n]), 8 + n


def _unpack(a: Array) -> State:
    entries, offset = _packed_header(a)
    view, out = memoryview(a.data), {}
    for name, dtype, shape in entries:
        dt = np.dtype(dtype)
        size = dt.itemsize * int(np.prod(shape, dtype=np.int64))
        out[name] = np.frombuffer(view[offset:offset + size], dtype=dt).reshape(shape).copy()
        offset += size
    return out


def to_array_record(state: State) -> ArrayRecord:
    """``state`` as one :data:`PACKED` array (names, dtypes, shapes and order kept exactly)."""
    return ArrayRecord({PACKED: _pack(state)})


def from_array_record(record: ArrayRecord, like: State | None = None) -> State:
    """Arrays back from a record: packed (:func:`to_array_record`) or one Array per name (RAW, or
    Flower's format, where a 0-d array such as BatchNorm's num_batches_tracked arrives with shape (1,));
    with ``like`` every array is given back the reference's shape (same size required)."""
    if PACKED in record and record[PACKED].stype == PACKED:
        out = _unpack(record[PACKED])
    else:
        out = {k: array_numpy(v) for k, v in record.items()}
    if like is not None:
        for k, ref in like.items():
            if k in out and out[k].shape != ref.shape and out[k].size == ref.size:
                out[k] = out[k].reshape(ref.shape)
    return out


def state_nbytes(state: State) -> int:
    return int(sum(v.nbytes for v in state.values()))


def _array_nbytes(a: Array) -> int:
    if a.stype == PACKED:
        entries, _ = _packed_header(a)
        return int(sum(np.dtype(d).itemsize * int(np.prod(s, dtype=np.int64)) for _, d, s in entries))
    return len(a.data) if a.stype == RAW else int(a.numpy().nbytes)


def records_nbytes(records: dict[str, ArrayRecord]) -> int:
    """Bytes of the arrays the records hold (without headers: what rounds.jsonl counts)."""
    return int(sum(_array_nbytes(v) for r in records.values() for v in r.values()))


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
    found: dict[int, dict[int, object]] = {}
    for key, record in content.array_records.items():
        if not key.startswith("hist."):
            continue
        arrays = from_array_record(record)
        members, index = arrays.pop("member"), arrays.pop("index")
        for j, (m, i) in enumerate(zip(members.tolist(), index.tolist())):
            found.setdefault(m, {})[i] = Entry.from_arrays({k: v[j] for k, v in arrays.items()})
    return {m: [entries[i] for i in sorted(entries)] for m, entries in sorted(found.items())}


class Encoder:
    """Converts each model and history set once per broadcast (keyed by object identity; the encoder
    keeps the objects alive, so an identity is never reused while it lives)."""

    def __init__(self):
        self._memo: dict[int, tuple[object, object]] = {}

    def _once(self, obj, make):
        key = id(obj)
        if key not in self._memo:
            self._memo[key] = (obj, make(obj))
        return self._memo[key][1]

    def arrays(self, state: State) -> ArrayRecord:
        return self._once(state, to_array_record)

    def histories(self, histories: dict[int, list[Entry]]) -> dict[str, ArrayRecord]:
        return self._once(histories, pack_histories)


# ------------------------------------------------------------------------------ requests
@dataclass
class Identify:
    hospital_ids: list[str]
    state: dict = field(default_factory=dict)  # where hospitals save method state (see Train.state)


@dataclass
class CheckInputs:
    """``query.inputs``: the hospital's task and the domains whose data it will read (its stream's and
    those it evaluates), sent once it is identified, so that it checks its own inputs before round 0."""

    task: str
    domains: list[str]


@dataclass
class Query:
    """``query.bank`` (FedDG amplitudes of round t's window) or ``query.dice`` (DiceEx: the Dice of
    ``model`` on round t's window)."""

    round: int
    task: str
    model: State | None = None


@dataclass
class Train:
    round: int
    task: str  # the hospital's task (JSON, :mod:`simlab.scenario.task`)
    model: State
    state: dict = field(default_factory=dict)  # state-key, state-dir, state-round (hospital-side method state)
    member: int | None = None  # ODEx detect mode: the member ``model`` is
    histories: dict[int, list[Entry]] | None = None  # ODEx detect mode: score the window first
    bank: dict[str, np.ndarray] | None = None  # FedDG: hospital → amplitude blocks
    want_entry: bool = False  # ODEx: return the window's statistics
    want_dice: bool = False  # ODEx ablations with score selection: return the window's Dice before training


@dataclass
class Evaluate:
    round: int
    task: str
    model: State | None = None  # one deployed model, or:
    members: dict[int, State] | None = None  # an ODEx pool, routed by its histories
    histories: dict[int, list[Entry]] | None = None
    oracle: dict[str, int] | None = None  # true domain → member trained on it most (evaluation only)
    state: dict = field(default_factory=dict)  # as Train.state: where the hospital's private state is
    domains: list[str] | None = None  # the test domains to evaluate (None: every domain of the task)
    bank: dict[str, np.ndarray] | None = None  # FedDG amplitude blocks, for adaptations that read them (fda)


# ------------------------------------------------------------------------------ replies
@dataclass
class IdentifyReply:
    hospital_id: str


@dataclass
class InputsReply:
    problems: list[tuple[str, str]]  # (key, message naming the file); empty: every input can be read


@dataclass
class BankReply:
    blocks: np.ndarray


@dataclass
class DiceReply:
    dice: float


@dataclass
class TrainReply:
    model: State | None  # None: the window belongs to another member (scores only)
    metrics: dict[str, float] = field(default_factory=dict)
    entry: Entry | None = None  # without its first block (``fb.``) when encoded
    shift: dict | None = None  # member id → window scores ``m<id>``, ``member``, ``score_s``


@dataclass
class EvaluateReply:
    metrics: dict[str, float]


# ------------------------------------------------------------------------------ encoding
def _metrics(values: dict[str, float]) -> MetricRecord:
    return MetricRecord({k: float(v) for k, v in values.items()})


def encode(msg, enc: Encoder | None = None) -> RecordDict:
    """The RecordDict of a request or reply."""
    enc = enc or Encoder()
    if isinstance(msg, Identify):
        return RecordDict({"config": ConfigRecord({"hospital-ids": list(msg.hospital_ids), **msg.state})})
    if isinstance(msg, IdentifyReply):
        return RecordDict({"config": ConfigRecord({"hospital-id": msg.hospital_id})})
    if isinstance(msg, CheckInputs):
        return RecordDict({"config": ConfigRecord({"task": msg.task, "domains": json.dumps(list(msg.domains))})})
    if isinstance(msg, InputsReply):
        return RecordDict({"config": ConfigRecord({"problems": json.dumps([list(p) for p in msg.problems])})})
    if isinstance(msg, Query):
        content = RecordDict({"config": ConfigRecord({"round": msg.round, "task": msg.task})})
        if msg.model is not None:
            content["arrays"] = enc.arrays(msg.model)
        return content
    if isinstance(msg, BankReply):
        return RecordDict({"bank": to_array_record({"blocks": msg.blocks})})
    if isinstance(msg, DiceReply):
        return RecordDict({"metrics": _metrics({"dice": msg.dice})})
    if isinstance(msg, Train):
        return _encode_train(msg, enc)
    if isinstance(msg, TrainReply):
        return _encode_train_reply(msg)
    if isinstance(msg, Evaluate):
        return _encode_evaluate(msg, enc)
    if isinstance(msg, EvaluateReply):
        return RecordDict({"metrics": _metrics(msg.metrics)})
    raise TypeError(f"not a simlab message: {type(msg).__name__}")


def _encode_train(msg: Train, enc: Encoder) -> RecordDict:
    config = {"round": msg.round, "task": msg.task, **msg.state}
    if msg.member is not None:
        config["member"] = msg.member
    if msg.want_entry:
        config["entry"] = True
    if msg.want_dice:
        config["dice"] = True
    content = RecordDict({"arrays": enc.arrays(msg.model), **(enc.histories(msg.histories) if msg.histories else {})})
    if msg.bank is not None:
        content["bank"] = enc.arrays(msg.bank)
    content["config"] = ConfigRecord(config)
    return content


def _encode_train_reply(msg: TrainReply) -> RecordDict:
    content = RecordDict({})
    if msg.model is not None:
        content["arrays"] = to_array_record(msg.model)
        content["metrics"] = _metrics({**msg.metrics, "num-examples": msg.metrics["num_examples"]})
    if msg.entry is not None:
        content["entry"] = to_array_record({k: v for k, v in msg.entry.to_arrays().items()
                                            if not k.startswith(FIRST_BLOCK)})
    if msg.shift is not None:
        content["shift"] = MetricRecord(msg.shift)
    return content


def _encode_evaluate(msg: Evaluate, enc: Encoder) -> RecordDict:
    config: dict = {"round": msg.round, "task": msg.task, **msg.state}
    if msg.domains is not None:
        config["domains"] = list(msg.domains)
    bank = {"bank": enc.arrays(msg.bank)} if msg.bank is not None else {}
    if msg.members is None:
        return RecordDict({"arrays": enc.arrays(msg.model), **bank, "config": ConfigRecord(config)})
    records = {f"m{m}": enc.arrays(state) for m, state in msg.members.items()}
    config.update(members=[int(m) for m in msg.members], oracle=json.dumps(msg.oracle or {}))
    return RecordDict({**records, **enc.histories(msg.histories or {}), "config": ConfigRecord(config)})


def histories_nbytes(histories: dict[int, list[Entry]]) -> int:
    """Bytes of :func:`pack_histories`' records without packing: every entry's arrays, plus its
    member and index (int64 each)."""
    return int(sum(v.nbytes for h in histories.values() for e in h for v in e.to_arrays().values())
               + 16 * sum(len(h) for h in histories.values()))


def broadcast_nbytes(msg: Train | Evaluate) -> int:
    """Array bytes a request carries (models, pool members, histories, bank), as counted in rounds.jsonl."""
    n = state_nbytes(msg.model) if msg.model is not None else 0
    if isinstance(msg, Evaluate) and msg.members is not None:
        n += sum(state_nbytes(s) for s in msg.members.values())
    if msg.histories:
        n += histories_nbytes(msg.histories)
    if msg.bank is not None:
        n += state_nbytes(msg.bank)
    return n


# ------------------------------------------------------------------------------ decoding
def decode_identify(content: RecordDict) -> Identify:
    cfg = content["config"]
    return Identify([str(h) for h in cfg["hospital-ids"]], {k: cfg[k] for k in cfg if k != "hospital-ids"})


def decode_check_inputs(content: RecordDict) -> CheckInputs:
    cfg = content["config"]
    return CheckInputs(str(cfg["task"]), [str(d) for d in json.loads(str(cfg["domains"]))])


def decode_inputs_reply(content: RecordDict) -> list[tuple[str, str]]:
    return [(str(key), str(msg)) for key, msg in json.loads(str(content["config"]["problems"]))]


def decode_query(content: RecordDict) -> Query:
    cfg = content["config"]
    model = from_array_record(content["arrays"]) if "arrays" in content else None
    return Query(int(cfg["round"]), str(cfg["task"]), model)


def decode_train(content: RecordDict) -> Train:
    cfg = content["config"]
    state = _state_config(cfg)
    bank = from_array_record(content["bank"]) if "bank" in content else None
    return Train(int(cfg["round"]), str(cfg["task"]), from_array_record(content["arrays"]), state,
                 member=int(cfg["member"]) if "member" in cfg else None,
                 histories=unpack_histories(content) or None, bank=bank, want_entry="entry" in cfg,
                 want_dice="dice" in cfg)


def _state_config(cfg) -> dict:
    return {k: cfg[k] for k in ("state-key", "state-dir", "state-round") if k in cfg}


def decode_evaluate(content: RecordDict) -> Evaluate:
    cfg = content["config"]
    domains = [str(d) for d in cfg["domains"]] if "domains" in cfg else None
    if "members" not in cfg:
        bank = from_array_record(content["bank"]) if "bank" in content else None
        return Evaluate(int(cfg["round"]), str(cfg["task"]), model=from_array_record(content["arrays"]),
                        state=_state_config(cfg), domains=domains, bank=bank)
    members = {int(m): from_array_record(content[f"m{int(m)}"]) for m in cfg["members"]}
    return Evaluate(int(cfg["round"]), str(cfg["task"]), members=members, histories=unpack_histories(content),
                    oracle={d: int(m) for d, m in json.loads(str(cfg["oracle"])).items()}, state=_state_config(cfg),
                    domains=domains)


def decode_train_reply(content: RecordDict, like: State, first_block: State | None = None) -> TrainReply:
    """``like``: the model sent (shapes); ``first_block``: the first block sent, re-attached to the entry."""
    model = from_array_record(content["arrays"], like=like) if "arrays" in content else None
    metrics = {k: float(v) for k, v in content["metrics"].items()} if "metrics" in content else {}
    return TrainReply(model, metrics, decode_entry(content, first_block), decode_shift(content))


def decode_entry(content: RecordDict, first_block: State | None = None) -> Entry | None:
    """The window statistics of a train reply, with the first block sent re-attached (None without)."""
    if "entry" not in content:
        return None
    fb = {f"{FIRST_BLOCK}{k}": v for k, v in (first_block or {}).items()}
    return Entry.from_arrays({**fb, **from_array_record(content["entry"])})


def decode_shift(content: RecordDict) -> dict | None:
    """The window scores of a train reply (ODEx detect mode), None without."""
    return dict(content["shift"]) if "shift" in content else None


def window_scores(shift: dict) -> dict[int, np.ndarray]:
    """Member id → the window's per-entry scores, from a train reply's ``shift``."""
    return {int(k[1:]): np.asarray(v, dtype=np.float64) for k, v in shift.items() if k[0] == "m" and k[1:].isdigit()}


def entry_nbytes(content: RecordDict) -> int:
    """Bytes of the window statistics a train reply carries (0 without)."""
    return records_nbytes({"entry": content["entry"]}) if "entry" in content else 0


def decode_metrics(content: RecordDict) -> dict[str, float]:
    return {k: float(v) for k, v in content["metrics"].items()}


def decode_bank(content: RecordDict) -> np.ndarray:
    return from_array_record(content["bank"])["blocks"]


def decode_identify_reply(content: RecordDict) -> str:
    return str(content["config"]["hospital-id"])
