"""The ClientApp: one hospital. It decodes a message, calls :class:`simlab.hospital.Hospital` and
encodes the reply; the hospital reads only its own stream.

Every message carries the part of the scenario this hospital needs (its task, JSON), so the same app
runs in simulation (virtual SuperNodes, ``partition-id`` in the node config) and in a deployment (a
SuperNode started with ``--node-config hospital-id=...``). What stays here is what belongs to the
node: its identity, its data directory, where it saves method state, fault injection for tests.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from simlab.checkpoint import HospitalStateStore
from simlab.federated import codec
from simlab.federated.codec import from_array_record, to_array_record
from simlab.hospital import Hospital
from simlab.scenario.inputs import site_input_problems
from simlab.scenario.task import HospitalTask, task_from_json

app = ClientApp()

STATE_KEY = "simlab-method-state"


def hospital_identity(node_config: dict, hospital_ids: list[str]) -> str:
    """Deployment: ``hospital-id`` from the node config; simulation: ``partition-id`` → i-th hospital."""
    if "hospital-id" in node_config:
        hid = str(node_config["hospital-id"])
        if hid not in hospital_ids:
            raise ValueError(f"node config hospital-id={hid!r} is not a hospital of this scenario "
                             f"({', '.join(hospital_ids)})")
        return hid
    if "partition-id" in node_config:
        pid = int(node_config["partition-id"])
        if not 0 <= pid < len(hospital_ids):
            raise ValueError(f"partition-id {pid} out of range for {len(hospital_ids)} hospitals")
        return hospital_ids[pid]
    raise ValueError("node config names no hospital: start the SuperNode with --node-config 'hospital-id=<id>'")


def node_data_dir(node_config) -> str | None:
    """``data-dir`` from the node config (None if absent), checked to be a directory on this node."""
    if "data-dir" not in node_config:
        return None
    path = str(node_config["data-dir"])
    if not Path(path).is_dir():
        raise ValueError(f"node config data-dir={path!r} is not a directory on this node")
    return path


def with_data_dir(task: dict, data_dir: str) -> dict:
    """The task pointed at this node's data directory (node config ``data-dir``).

    phantom: the generated-data cache lives in ``data-dir``. nifti: dataset ``name`` is read from
    ``<data-dir>/<name>`` when that folder exists (a node holding a single dataset may also keep it
    directly in ``data-dir``), other datasets keep the server's path; the cache goes to this node's
    default ($SIMLAB_CACHE), since the server's cache path means nothing here. Generated data does not
    depend on where it is cached (cache keys leave ``cache_dir`` out), so results are unchanged.
    """
    root = Path(data_dir)
    data = dict(task["data"])
    if data.get("source", "phantom") == "nifti":
        datasets = dict(data.get("datasets", {}))
        for name, ds in datasets.items():
            if (root / name).is_dir():
                datasets[name] = {**ds, "root": str(root / name)}
            elif len(datasets) == 1 and (root / "dataset.json").is_file():
                datasets[name] = {**ds, "root": str(root)}
        data["datasets"] = datasets
        data["cache_dir"] = None
    else:
        data["cache_dir"] = str(root)
    return {**task, "data": data}


def _node_task(task: str, data_dir: str | None) -> HospitalTask:
    """The task of a message as this node runs it: with the node's ``data-dir`` (None: as sent)."""
    plain = json.loads(task)
    return task_from_json(json.dumps(with_data_dir(plain, data_dir) if data_dir else plain))


@lru_cache(maxsize=8)
def _hospital(task: str, data_dir: str | None = None) -> Hospital:
    return Hospital(_node_task(task, data_dir))


def _own_task(node_config, hospital_id: str) -> None:
    """A deployment node (``hospital-id`` in its node config) refuses a task meant for another hospital."""
    if "hospital-id" in node_config and str(node_config["hospital-id"]) != hospital_id:
        raise ValueError(f"this node is hospital {str(node_config['hospital-id'])!r} but was sent the task of "
                         f"{hospital_id!r}")


def _node_hospital(task: str, context: Context) -> Hospital:
    """The message's task as this node runs it (:func:`_node_task`), for this node's hospital only."""
    hospital = _hospital(task, node_data_dir(context.node_config))
    _own_task(context.node_config, hospital.id)
    return hospital


def _injected_failure(context: Context, t: int) -> None:
    """Fault injection for deployment tests: node config ``fail-at-round=<t>`` makes training raise in
    round t (only there: the hospital is back in round t + 1)."""
    at = context.node_config.get("fail-at-round")
    if at is not None and int(at) == t:
        raise RuntimeError(f"failure injected by node config fail-at-round={at}")


def _state_store(state_cfg: dict, context: Context, hospital_id: str) -> HospitalStateStore | None:
    """Where this hospital saves its method state so that a restarted server can continue the run:
    node config ``state-dir`` (a deployment), else the directory the server names (simulation, where
    every hospital runs on the server's machine). None when the server asks for nothing to be saved."""
    if "state-key" not in state_cfg:
        return None
    root = context.node_config.get("state-dir", state_cfg.get("state-dir"))
    if root is None:
        raise ValueError("this scenario's continual method keeps state at the hospital between rounds, which is "
                         "saved on the hospital's disk so that the run survives a server restart: start the "
                         "SuperNode with --node-config 'state-dir=<a writable directory>'")
    return HospitalStateStore(str(root), str(state_cfg["state-key"]), hospital_id)


def _method_state(state_cfg: dict, context: Context, store: HospitalStateStore | None) -> dict[str, np.ndarray]:
    """The method state this round continues from: this run's own (in the node's context), else, after
    a server restart, the state saved after the round the server last received this hospital's update."""
    if STATE_KEY in context.state:
        return from_array_record(context.state[STATE_KEY])
    if store is not None and int(state_cfg["state-round"]) > 0:
        return store.load(int(state_cfg["state-round"]))
    return {}


def _reply(msg: Message, reply) -> Message:
    return Message(codec.encode(reply), reply_to=msg)


@app.query()
def identify(msg: Message, context: Context) -> Message:
    req = codec.decode_identify(msg.content)
    hid = hospital_identity(dict(context.node_config), req.hospital_ids)
    node_data_dir(context.node_config)  # a wrong data-dir stops the run here, not round by round
    _state_store(req.state, context, hid)  # so does a missing state-dir
    return _reply(msg, codec.IdentifyReply(hid))


@app.query("inputs")
def check_inputs(msg: Message, context: Context) -> Message:
    """After identification: the inputs this hospital will read, checked where they are (the NIfTI
    datasets of the domains the server names, with this node's ``data-dir``; its data cache). The
    problems go back to the server, which stops the run before round 0 naming this hospital and node."""
    req = codec.decode_check_inputs(msg.content)
    data_dir = node_data_dir(context.node_config)
    task = _node_task(req.task, data_dir)
    _own_task(context.node_config, task.hospital.id)
    cache_key = f"node config data-dir={data_dir!r} (this node's data cache)" if data_dir else None
    problems = site_input_problems(task, req.domains, cache_key if task.data.source != "nifti" else None)
    if data_dir:  # a dataset not found under data-dir keeps the server's path: say where this node looked
        problems = [(key, f"{why} (this node's data-dir: {data_dir})" if key.startswith("data.datasets.") else why)
                    for key, why in problems]
    return _reply(msg, codec.InputsReply(problems))


@app.query("bank")
def share_amplitudes(msg: Message, context: Context) -> Message:
    """FedDG: low-frequency amplitude blocks of a sample of this round's window."""
    req = codec.decode_query(msg.content)
    return _reply(msg, codec.BankReply(_node_hospital(req.task, context).amplitudes(req.round)))


@app.query("dice")
def window_dice(msg: Message, context: Context) -> Message:
    """DiceEx query: Dice of the received member on this round's labelled window, before training."""
    req = codec.decode_query(msg.content)
    return _reply(msg, codec.DiceReply(_node_hospital(req.task, context).window_dice(req.model, req.round)))


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received model; in ODEx detect mode score the window first, and train only when the
    window belongs to the member that was sent (else reply with the scores alone)."""
    req = codec.decode_train(msg.content)
    hospital = _node_hospital(req.task, context)
    _injected_failure(context, req.round)
    shift = hospital.window_decision(req.histories, req.round) if req.histories else None
    if shift is not None and int(shift["member"]) != req.member:
        return _reply(msg, codec.TrainReply(None, shift=shift))  # another member: not trained
    store = _state_store(req.state, context, hospital.id)
    out = hospital.train(req.model, req.round, _method_state(req.state, context, store), req.bank, req.want_entry,
                        req.want_dice)
    if out.method_state:
        context.state[STATE_KEY] = to_array_record(out.method_state)
        if store is not None:
            store.save(req.round, out.method_state)
            store.prune(keep_from=int(req.state["state-round"]))
    return _reply(msg, codec.TrainReply(out.state, out.metrics, out.entry, shift))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Every registered metric of the model deployed at this hospital (or the routed ODEx pool) on the
    test set of each domain the message names (every evaluation domain when it names none)."""
    req = codec.decode_evaluate(msg.content)
    hospital = _node_hospital(req.task, context)
    if req.members is None:
        local = hospital.task.federation.norm == "local"  # only then does the deployed model use private state
        private = _method_state(req.state, context, _state_store(req.state, context, hospital.id)) if local else {}
        out = hospital.evaluate(req.model, private, req.domains, t=req.round, bank=req.bank)
    else:
        out = hospital.evaluate_pool(req.members, req.histories, req.oracle, req.domains)
    n_domains = len(hospital.task.eval_domains if req.domains is None else req.domains)
    out["num-examples"] = float(n_domains * hospital.task.evaluation.test_size)
    return _reply(msg, codec.EvaluateReply(out))
