"""The ClientApp: one hospital. It reads only its own stream and trains/evaluates what it is sent.

Every message carries the part of the scenario this hospital needs (``task``, JSON), so the same app
runs in simulation (virtual SuperNodes, ``partition-id`` in the node config) and in a deployment (a
SuperNode started with ``--node-config hospital-id=...``).
"""

from __future__ import annotations

import json
import threading
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from simlab.augment.frequency import FrequencyAugmenter, make_bank_entries
from simlab.checkpoint import HospitalStateStore
from simlab.continual.baselines import make_method
from simlab.continual.odex import (ScoreCache, combine, decide, fit_entry, member_threshold, pool_scores,
                                   window_features)
from simlab.continual.training import TrainConfig, pick_device
from simlab.data.streams import DataFactory, HospitalStream
from simlab.federated.messages import from_array_record, metrics, to_array_record, unpack_histories
from simlab.metrics.registry import metric_rows
from simlab.metrics.segmentation import dice_per_class, predict
from simlab.models.unet import build_model, load_numpy_state, state_to_numpy
from simlab.config import build
from simlab.scenario.schema import Scenario
from simlab.seeding import derive_seed

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


@lru_cache(maxsize=8)
def _task(task_json: str, data_dir: str | None = None) -> tuple[Scenario, HospitalStream, DataFactory]:
    plain = json.loads(task_json)
    scenario = build(Scenario, with_data_dir(plain, data_dir) if data_dir else plain, "<task sent by the server>")
    factory = DataFactory(scenario.data, scenario.domains, scenario.seed, scenario.evaluation.test_size)
    return scenario, HospitalStream(factory, scenario.hospitals[0]), factory


def _node_task(cfg, context: Context) -> tuple[Scenario, HospitalStream, DataFactory]:
    """The message's task as this node runs it: with the node's ``data-dir``; a deployment node
    (``hospital-id`` in its node config) refuses a task meant for another hospital."""
    node = context.node_config
    scenario, stream, factory = _task(str(cfg["task"]), node_data_dir(node))
    if "hospital-id" in node and str(node["hospital-id"]) != stream.hospital.id:
        raise ValueError(f"this node is hospital {str(node['hospital-id'])!r} but was sent the task of "
                         f"{stream.hospital.id!r}")
    return scenario, stream, factory


def _injected_failure(context: Context, t: int) -> None:
    """Fault injection for deployment tests: node config ``fail-at-round=<t>`` makes training raise in
    round t (only there: the hospital is back in round t + 1)."""
    at = context.node_config.get("fail-at-round")
    if at is not None and int(at) == t:
        raise RuntimeError(f"failure injected by node config fail-at-round={at}")


def _state_store(cfg, context: Context, hospital_id: str) -> HospitalStateStore | None:
    """Where this hospital saves its method state so that a restarted server can continue the run:
    node config ``state-dir`` (a deployment), else the directory the server names (simulation, where
    every hospital runs on the server's machine). None when the server asks for nothing to be saved."""
    if "state-key" not in cfg:
        return None
    root = context.node_config.get("state-dir", cfg.get("state-dir"))
    if root is None:
        raise ValueError("this scenario's continual method keeps state at the hospital between rounds, which is "
                         "saved on the hospital's disk so that the run survives a server restart: start the "
                         "SuperNode with --node-config 'state-dir=<a writable directory>'")
    return HospitalStateStore(str(root), str(cfg["state-key"]), hospital_id)


def _method_state(cfg, context: Context, store: HospitalStateStore | None) -> dict[str, np.ndarray]:
    """The method state this round continues from: this run's own (in the node's context), else, after
    a server restart, the state saved after the round the server last received this hospital's update."""
    if STATE_KEY in context.state:
        return from_array_record(context.state[STATE_KEY])
    if store is not None and int(cfg["state-round"]) > 0:
        return store.load(int(cfg["state-round"]))
    return {}


def _setup(scenario: Scenario) -> str:
    threads = max(1, int(scenario.engine.cpus_per_client))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(scenario.engine.deterministic, warn_only=True)
    return pick_device(scenario.engine.device)


def _model(scenario: Scenario, arrays: ArrayRecord, device: str) -> torch.nn.Module:
    model = build_model(scenario.model, scenario.num_classes)
    load_numpy_state(model, from_array_record(arrays))
    return model.to(device)


@app.query()
def identify(msg: Message, context: Context) -> Message:
    ids = list(msg.content["config"]["hospital-ids"])
    hid = hospital_identity(dict(context.node_config), ids)
    node_data_dir(context.node_config)  # a wrong data-dir stops the run here, not round by round
    _state_store(msg.content["config"], context, hid)  # so does a missing state-dir
    return Message(RecordDict({"config": ConfigRecord({"hospital-id": hid})}), reply_to=msg)


@app.query("bank")
def share_amplitudes(msg: Message, context: Context) -> Message:
    """FedDG: low-frequency amplitude blocks of a sample of this round's window. Only these blocks
    leave the hospital; images and phases never do."""
    cfg = msg.content["config"]
    scenario, stream, _ = _node_task(cfg, context)
    t = int(cfg["round"])
    window = stream.window(t)
    blocks = make_bank_entries(torch.from_numpy(window.images), scenario.augmentation.frequency,
                               np.random.default_rng(derive_seed(scenario.seed, "bank", stream.hospital.id, t)))
    return Message(RecordDict({"bank": to_array_record({"blocks": blocks.numpy()})}), reply_to=msg)


def _augmenter(scenario: Scenario, msg: Message, hospital_id: str, t: int) -> FrequencyAugmenter | None:
    if not scenario.augmentation.frequency.enabled or "bank" not in msg.content:
        return None
    bank = {h: torch.from_numpy(a) for h, a in from_array_record(msg.content["bank"]).items()}
    gen = torch.Generator().manual_seed(derive_seed(scenario.seed, "augment", hospital_id, t))
    return FrequencyAugmenter(scenario.augmentation.frequency, bank, hospital_id, gen)


def _received(msg: Message, context: Context):
    """The scenario part, stream, round, device and received model of a message."""
    cfg = msg.content["config"]
    scenario, stream, _ = _node_task(cfg, context)
    device = _setup(scenario)
    return scenario, stream, int(cfg["round"]), device, _model(scenario, msg.content["arrays"], device)


@app.train()
def train(msg: Message, context: Context) -> Message:
    scenario, stream, t, device, model = _received(msg, context)
    _injected_failure(context, t)
    shift = _window_decision(scenario, msg, stream, t, device)
    if shift is not None and int(shift["member"]) != int(msg.content["config"]["member"]):
        return Message(RecordDict({"shift": MetricRecord(shift)}), reply_to=msg)  # another member: not trained
    fed = scenario.federation
    train_cfg = TrainConfig(steps=fed.local_steps, batch_size=fed.batch_size, lr=fed.lr, optimizer=fed.optimizer,
                            epochs=fed.local_epochs, flip=scenario.augmentation.flip, device=device,
                            episodic=scenario.augmentation.frequency.enabled and scenario.augmentation.frequency.episodic)
    method = make_method(scenario.continual)
    entry = _odex_entry(scenario, model, stream.window(t), t, device) if scenario.continual.method == "odex" else None
    store = _state_store(msg.content["config"], context, stream.hospital.id)
    state = _method_state(msg.content["config"], context, store)
    result = method.local_update(model, stream, t, state, train_cfg,
                                 seed=derive_seed(scenario.seed, "train", stream.hospital.id, t),
                                 augment=_augmenter(scenario, msg, stream.hospital.id, t))
    if result.state:
        context.state[STATE_KEY] = to_array_record(result.state)
        if store is not None:
            store.save(t, result.state)
            store.prune(keep_from=int(msg.content["config"]["state-round"]))
    content = RecordDict({"arrays": to_array_record(state_to_numpy(model)),
                          "metrics": metrics({**result.metrics, "num-examples": result.metrics["num_examples"]})})
    if entry is not None:
        content["entry"] = to_array_record({k: v for k, v in entry.to_arrays().items() if not k.startswith("fb.")})
    if shift is not None:
        content["shift"] = MetricRecord(shift)
    return Message(content, reply_to=msg)


def _window_decision(scenario: Scenario, msg: Message, stream: HospitalStream, t: int, device: str) -> dict | None:
    """ODEx, detect mode (the message carries the pool's histories): this round's window's mean
    normalised score under every entry of every member (``m<id>``), the member :func:`decide` picks
    (``member``) and the scoring time (``score_s``, for the cost report). None without histories."""
    histories = unpack_histories(msg.content) if scenario.continual.method == "odex" else {}
    if not histories:
        return None
    start = time.perf_counter()
    scores = {m: s.mean(axis=1) for m, s in _scores(scenario, histories, stream.window(t).images, device).items()}
    d = decide(scores, histories, scenario.continual.odex.shift)
    return {**{f"m{m}": [float(v) for v in s] for m, s in scores.items()}, "member": d.member,
            "score_s": time.perf_counter() - start}


def _odex_entry(scenario: Scenario, model: torch.nn.Module, window, t: int, device: str):
    """Statistics of this round's whole window (labelled or not) under the member's first block as
    received (before training); the server adds the first-block weights it sent."""
    odex = scenario.continual.odex
    z = window_features(model, odex.features, window.images, device=device)
    return fit_entry(z, {}, odex.shift, t)


# Scores and features of images this process has scored before, by content (test sets at every
# evaluation; in simulation one long-lived worker process serves several hospitals, which evaluate on the
# same test sets). A hit returns the bits a cold computation would; a process that lives for one message
# (a deployment) never hits. 64 MiB holds the features and scores of thousands of (entry, test set) pairs.
_SCORES = ScoreCache(max_bytes=64 << 20)
_TEMPLATES: dict[tuple[str, int, str], torch.nn.Module] = {}
_TEMPLATE_LOCK = threading.Lock()


def _scores(scenario: Scenario, histories: dict[int, list], images: np.ndarray, device: str) -> dict[int, np.ndarray]:
    """ODEx per-entry scores of ``images`` under every member's history (``pool_scores``). The model the
    entries' first blocks are loaded into is built once per process and architecture, not per message:
    scoring overwrites every first-block tensor it uses before using it, so what the template held
    before does not matter (the lock keeps two messages of one process from sharing it at once)."""
    odex = scenario.continual.odex
    key = (repr(scenario.model), scenario.num_classes, str(device))
    with _TEMPLATE_LOCK:
        if key not in _TEMPLATES:
            if len(_TEMPLATES) >= 4:
                _TEMPLATES.pop(next(iter(_TEMPLATES)))
            _TEMPLATES[key] = build_model(scenario.model, scenario.num_classes).to(device)
        return pool_scores(_TEMPLATES[key], odex.features, odex.shift, histories, images, device, cache=_SCORES)


@app.query("dice")
def window_dice(msg: Message, context: Context) -> Message:
    """DiceEx query: Dice of the received member on this round's labelled window, before training."""
    scenario, stream, t, device, model = _received(msg, context)
    w = stream.window(t)
    pred = predict(model, w.images[w.labeled], scenario.evaluation.batch_size, device)
    dice = dice_per_class(pred, torch.from_numpy(w.labels[w.labeled].astype(np.int64)), scenario.num_classes)
    return Message(RecordDict({"metrics": metrics({"dice": float(dice.mean())})}), reply_to=msg)


def _routes(scenario: Scenario, histories: dict[int, list], pool_ids: list[int],
            tests: dict[str, tuple[np.ndarray, np.ndarray]], device: str) -> dict[str, np.ndarray]:
    """ODEx routing of every test image: the member with the lowest score / threshold. All test sets
    are scored in one pass: one model set-up and one set of patch moments serve every history entry."""
    scored = [m for m in pool_ids if histories.get(m)]
    if not scored:
        return {domain: np.full(len(images), pool_ids[0]) for domain, (images, _) in tests.items()}
    shift = scenario.continual.odex.shift
    sizes = [len(images) for images, _ in tests.values()]
    all_images = np.concatenate([images for images, _ in tests.values()])
    per_entry = _scores(scenario, {m: histories[m] for m in scored}, all_images, device)
    S = np.stack([combine(per_entry[m], shift) / member_threshold(histories[m], shift) for m in scored], axis=1)
    routed = np.array(scored)[np.argmin(S, axis=1)]
    bounds = np.cumsum([0] + sizes)
    return {domain: routed[a:b] for domain, a, b in zip(tests, bounds[:-1], bounds[1:])}


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Dice of the deployed model on every domain's test set. With an ODEx pool: each image is routed
    to the member with the lowest score / threshold (``dice``), and also sent to the member that
    trained most on the image's true domain (``dice_oracle``); ``routing_purity`` is the share of a
    domain's images routed to that member."""
    cfg = msg.content["config"]
    scenario, _, factory = _node_task(cfg, context)
    device = _setup(scenario)
    out: dict[str, float] = {}
    pool_ids = [int(m) for m in cfg["members"]] if "members" in cfg else []
    models: dict[int, torch.nn.Module] = {}  # pool members, built when an image first needs one

    def member(m: int) -> torch.nn.Module:
        if m not in models:
            models[m] = _model(scenario, msg.content[f"m{m}"], device)
        return models[m]

    tests = {domain: factory.test_set(domain) for domain in scenario.eval_domains}
    deployed = None if pool_ids else _model(scenario, msg.content["arrays"], device)
    if pool_ids:
        routes = _routes(scenario, unpack_histories(msg.content), pool_ids, tests, device)
        oracle = json.loads(str(cfg["oracle"]))
    for domain, (images, labels) in tests.items():
        target = torch.from_numpy(labels.astype(np.int64))
        if not pool_ids:
            pred = predict(deployed, images, scenario.evaluation.batch_size, device)
            out.update(metric_rows(domain, pred, target, scenario.num_classes))
            continue
        routed = routes[domain]
        pred = torch.zeros_like(target)
        for m in np.unique(routed):
            sel = routed == m
            pred[torch.from_numpy(sel)] = predict(member(int(m)), images[sel], scenario.evaluation.batch_size, device)
        out.update(metric_rows(domain, pred, target, scenario.num_classes))
        if domain in oracle:  # only for domains some member has trained on
            best = int(oracle[domain])
            pred_o, other = pred.clone(), routed != best  # images routed to the oracle member are done
            if other.any():
                pred_o[torch.from_numpy(other)] = predict(member(best), images[other], scenario.evaluation.batch_size,
                                                          device)
            out.update(metric_rows(domain, pred_o, target, scenario.num_classes, names=("dice",), suffix="_oracle",
                                   per_class=False))
            out[f"routing_purity/{domain}"] = float(np.mean(routed == best))
    out["num-examples"] = float(len(scenario.eval_domains) * scenario.evaluation.test_size)
    return Message(RecordDict({"metrics": metrics(out)}), reply_to=msg)
