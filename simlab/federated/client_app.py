"""The ClientApp: one hospital. It reads only its own stream and trains/evaluates what it is sent.

Every message carries the part of the scenario this hospital needs (``task``, JSON), so the same app
runs in simulation (virtual SuperNodes, ``partition-id`` in the node config) and in a deployment (a
SuperNode started with ``--node-config hospital-id=...``).
"""

from __future__ import annotations

import json
from functools import lru_cache

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from simlab.augment.frequency import FrequencyAugmenter, make_bank_entries
from simlab.continual.baselines import make_method
from simlab.continual.training import TrainConfig, pick_device
from simlab.data.streams import DataFactory, HospitalStream
from simlab.federated.messages import from_array_record, metrics, to_array_record
from simlab.metrics.segmentation import dice_per_class, predict
from simlab.models.unet import build_model, load_numpy_state, state_to_numpy
from simlab.scenario.loader import build
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


@lru_cache(maxsize=8)
def _task(task_json: str) -> tuple[Scenario, HospitalStream, DataFactory]:
    scenario = build(Scenario, json.loads(task_json), "<task sent by the server>")
    factory = DataFactory(scenario.data, scenario.domains, scenario.seed, scenario.evaluation.test_size)
    return scenario, HospitalStream(factory, scenario.hospitals[0]), factory


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
    return Message(RecordDict({"config": ConfigRecord({"hospital-id": hid})}), reply_to=msg)


@app.query("bank")
def share_amplitudes(msg: Message, context: Context) -> Message:
    """FedDG: low-frequency amplitude blocks of a sample of this round's window. Only these blocks
    leave the hospital; images and phases never do."""
    cfg = msg.content["config"]
    scenario, stream, _ = _task(str(cfg["task"]))
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


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = msg.content["config"]
    scenario, stream, _ = _task(str(cfg["task"]))
    t = int(cfg["round"])
    device = _setup(scenario)
    model = _model(scenario, msg.content["arrays"], device)
    fed = scenario.federation
    train_cfg = TrainConfig(steps=fed.local_steps, batch_size=fed.batch_size, lr=fed.lr, optimizer=fed.optimizer,
                            epochs=fed.local_epochs, flip=scenario.augmentation.flip, device=device,
                            episodic=scenario.augmentation.frequency.enabled and scenario.augmentation.frequency.episodic)
    method = make_method(scenario.continual.method)
    state = from_array_record(context.state[STATE_KEY]) if STATE_KEY in context.state else {}
    result = method.local_update(model, stream, t, state, train_cfg,
                                 seed=derive_seed(scenario.seed, "train", stream.hospital.id, t),
                                 augment=_augmenter(scenario, msg, stream.hospital.id, t))
    if result.state:
        context.state[STATE_KEY] = to_array_record(result.state)
    content = RecordDict({"arrays": to_array_record(state_to_numpy(model)),
                          "metrics": metrics({**result.metrics, "num-examples": result.metrics["num_examples"]})})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg = msg.content["config"]
    scenario, _, factory = _task(str(cfg["task"]))
    device = _setup(scenario)
    model = _model(scenario, msg.content["arrays"], device)
    out: dict[str, float] = {}
    for domain in scenario.eval_domains:
        images, labels = factory.test_set(domain)
        pred = predict(model, images, scenario.evaluation.batch_size, device)
        dice = dice_per_class(pred, torch.from_numpy(labels.astype(np.int64)), scenario.num_classes)
        out[f"dice/{domain}"] = float(dice.mean())
        for c in range(dice.shape[1]):
            out[f"dice_c{c + 1}/{domain}"] = float(dice[:, c].mean())
    out["num-examples"] = float(len(scenario.eval_domains) * scenario.evaluation.test_size)
    return Message(RecordDict({"metrics": metrics(out)}), reply_to=msg)
