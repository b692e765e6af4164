"""The federation of one arm: orchestrates rounds with Flower's Message API (Grid push/pull).

A round: sample hospitals (seeded, then ordered by hospital id) → send each the global model and its
part of the scenario (``train``) → aggregate the replies in hospital-id order, whatever order they
arrived in → evaluate (every k rounds, at round 0, at the end and wherever the metrics need a reading:
:func:`evaluation_rounds`) →
write a checkpoint (:mod:`simlab.checkpoint`). The true domain of each window comes from the
scenario's drift schedule and is used for evaluation and logging only; it is never sent to a hospital.

Evaluation follows what is deployed (:meth:`Federation.deployed_per_hospital`): a model that differs
per hospital (local normalisation) is evaluated by every hospital on every domain, rows under each
hospital; a model deployed identically everywhere is evaluated once per domain, by the evaluators of
:func:`simlab.federated.eval_plan.assign_evaluators` (nobody else is contacted), rows under
:data:`simlab.runlog.SHARED`, which every hospital's R reads as its own. rounds.jsonl has the
training and evaluation time of each round (``train_s``, ``eval_s``), the evaluation's bytes down
(``eval_bytes_down``, included in ``bytes_down``) and its evaluators.

Resuming (``resume=True``): the arm's checkpoint is loaded, metrics.jsonl and rounds.jsonl are cut
back to their lengths at that checkpoint, and the run goes on with the next round. An arm with no
checkpoint starts from the beginning.
"""

from __future__ import annotations

import logging
import secrets
import time

import numpy as np
from flwr.app import Message
from flwr.serverapp import Grid

from simlab import interrupt
from simlab.checkpoint import CheckpointError, checkpoint_path, flat, load_checkpoint, nest, save_checkpoint
from simlab.continual.registry import method_class
from simlab.data.drift import contribution_span, true_domains
from simlab.adaptation.registry import adaptation_class
from simlab.aggregation import EmptyAggregation, OptState, aggregate, make_server_optimizer
from simlab.federated import codec
from simlab.federated.codec import state_nbytes
from simlab.federated.eval_plan import assign_evaluators
from simlab.models.norm import norm_state_keys
from simlab.models.unet import build_model, state_to_numpy, trainable_keys
from simlab.results import metric_rounds
from simlab.rundir import settings_fingerprint
from simlab.runlog import SHARED, RunLog
from simlab.scenario.task import task_json, task_of
from simlab.config import to_plain
from simlab.scenario.schema import Scenario
from simlab.seeding import derive_seed, rng, seed_everything

log = logging.getLogger("simlab")


class FederationError(RuntimeError):
    pass


def evaluation_rounds(scenario: Scenario) -> list[int]:
    """Round 0 (initial model), every k rounds, the end and, with ``evaluation.at_boundaries``, every round
    the metrics read (:func:`simlab.results.metric_rounds`): the last round of every stage of every
    hospital and of the pooled stages (for gradual and population drift the last round before the
    transition) and the last round each domain contributes to a hospital's window before leaving it."""
    T = scenario.federation.rounds
    rounds = {0, T} | {t for t in range(1, T + 1) if t % scenario.evaluation.every == 0}
    if scenario.evaluation.at_boundaries:
        rounds |= metric_rounds(scenario)
    return sorted(rounds)


PULL_INTERVAL_S = 0.1
"""Seconds between pulls for replies: Flower's in-memory (simulation) grid's own interval. Its HTTP grid
(a deployment's ServerApp, pulling from the SuperLink on the same machine) sleeps 3 s, which added up
to 3 s to every message exchange of a deployed round."""


def send_and_receive(grid: Grid, messages: list[Message], timeout: float) -> list[Message]:
    """``Grid.send_and_receive`` (push, then pull every :data:`PULL_INTERVAL_S` until every reply is in
    or ``timeout`` passed), stopping as soon as the run is asked to stop (:mod:`simlab.interrupt`):
    Flower's own loop would keep the ServerApp waiting, and the process alive, after a Ctrl-C."""
    pending = set(grid.push_messages(messages))
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    while True:
        got = list(grid.pull_messages(pending))
        replies += got
        pending -= {m.metadata.reply_to_message_id for m in got}
        if not pending or time.monotonic() >= deadline:
            return replies
        interrupt.check()
        time.sleep(PULL_INTERVAL_S)


def wait_for_nodes(grid: Grid, n: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        interrupt.check()
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= n:
            return nodes
        if time.monotonic() > deadline:
            raise FederationError(f"only {len(nodes)} of {n} hospitals connected within {timeout:.0f} s "
                                  f"(federation.connect_timeout_s)")
        time.sleep(0.2)


def settings_hash(scenario: Scenario) -> str:
    """Fingerprint of everything that decides an arm's results, its seed included (see
    :func:`simlab.rundir.settings_fingerprint`)."""
    return settings_fingerprint(to_plain(scenario), seed=True)


class Federation:
    def __init__(self, grid: Grid, scenario: Scenario, runlog: RunLog, *, resume: bool = False,
                 hospital_state_dir: str | None = None):
        self.grid = grid
        self.sc = scenario
        self.log = runlog
        self.ids = [h.id for h in scenario.hospitals]
        self.trainers = [h.id for h in scenario.hospitals if h.participates]  # participates: false never trains
        self.parts = {h: task_json(task_of(scenario, h)) for h in self.ids}
        self.domains = {h.id: true_domains(h.drift, scenario.federation.rounds) for h in scenario.hospitals}
        self.timeout = scenario.federation.round_timeout_s
        self.bank: dict[str, np.ndarray] = {}
        # the evaluation's adaptation reads the bank (fda): collected even when the augmentation is off
        self.eval_bank = adaptation_class(scenario.evaluation).needs_bank
        self.resume = resume
        self.ckpt = checkpoint_path(runlog.run_dir, runlog.arm) if scenario.output.checkpoint else None
        # hospital-side state (EWC, replay) is saved at the hospital when it must survive a restart;
        # in simulation the server names the directory (every hospital shares this machine)
        self.saves_state = self.ckpt is not None and (method_class(scenario.continual).keeps_state
                                                      or scenario.federation.norm == "local")
        self.local: set[str] = set()  # FedBN: the normalisation keys that stay at the hospitals
        self.hospital_state_dir = hospital_state_dir
        self.last_trained: dict[str, int] = {}  # hospital → last round whose update reached the server
        self.run_key = ""
        self.elapsed = 0.0
        self.server_opt = make_server_optimizer(scenario.federation.server_optimizer)  # None: the aggregate is the model
        self.opt_state = OptState()  # the server optimiser's m, v and step count (checkpointed)

    # ------------------------------------------------------------------ messaging
    def _send(self, kind: str, targets: list[str], requests: dict) -> dict[str, Message]:
        """Send each target its request (one :class:`codec.Encoder` for the broadcast, so a model sent
        to many hospitals is converted once); the replies in hospital order."""
        enc = codec.Encoder()
        msgs = [Message(codec.encode(requests[h], enc), dst_node_id=self.node_of[h], message_type=kind)
                for h in targets]
        replies = send_and_receive(self.grid, msgs, self.timeout)
        by_node = {self.node_of[h]: h for h in targets}
        out = {}
        for reply in replies:
            h = by_node.get(reply.metadata.src_node_id)
            if h is not None:
                out[h] = reply
        return dict(sorted(out.items(), key=lambda kv: self.ids.index(kv[0])))

    def identify(self) -> None:
        """Which node is which hospital (every node answers with the hospital its node config names),
        then every hospital checks its own inputs (:meth:`check_inputs`)."""
        nodes = wait_for_nodes(self.grid, len(self.ids), self.sc.federation.connect_timeout_s)
        ask = codec.encode(codec.Identify(self.ids, self.state_config()))
        msgs = [Message(ask, dst_node_id=n, message_type=codec.IDENTIFY) for n in nodes]
        self.node_of: dict[str, int] = {}
        for reply in send_and_receive(self.grid, msgs, self.timeout):
            if reply.has_error():
                raise FederationError(f"node {reply.metadata.src_node_id} could not identify its hospital: "
                                      f"{reply.error.reason}")
            hid = codec.decode_identify_reply(reply.content)
            if hid in self.node_of:
                raise FederationError(f"two nodes claim hospital {hid!r}")
            self.node_of[hid] = reply.metadata.src_node_id
        missing = [h for h in self.ids if h not in self.node_of]
        if missing:
            raise FederationError(f"no node answered for hospital(s) {', '.join(missing)}")
        self.check_inputs()

    def domains_read(self) -> dict[str, list[str]]:
        """Per hospital, the domains whose data it reads: those its windows draw on (its own data, read
        also where it only tests, e.g. by a test-time adaptation) and those it evaluates
        (:meth:`evaluation_plan`)."""
        plan, rounds = self.evaluation_plan(), self.sc.federation.rounds
        out = {}
        for h in self.sc.hospitals:
            evaluated = plan.get(h.id, [])
            drawn = contribution_span(h.drift, rounds)
            out[h.id] = sorted(set(drawn) | set(self.sc.eval_domains if evaluated is None else evaluated))
        return out

    def check_inputs(self) -> None:
        """Each identified hospital checks the inputs it will read, where they are (its NIfTI datasets with
        its node's data directory, its data cache; :func:`simlab.scenario.inputs.site_input_problems`),
        before round 0: in a deployment the server cannot see them. One :class:`FederationError` lists
        every problem, each naming the hospital, its node, the key and the file."""
        domains = self.domains_read()
        replies = self._send(codec.INPUTS, self.ids, {h: codec.CheckInputs(self.parts[h], domains[h]) for h in self.ids})
        problems = []
        for h in self.ids:
            where, reply = f"hospital {h} (node {self.node_of[h]})", replies.get(h)
            if reply is None:
                problems.append(f"{where}: no answer to the input check within {self.timeout:.0f} s "
                                f"(federation.round_timeout_s)")
            elif reply.has_error():
                problems.append(f"{where}: the input check failed: {reply.error.reason}")
            else:
                problems += [f"{where}: {key}: {msg}" for key, msg in codec.decode_inputs_reply(reply.content)]
        if problems:
            raise FederationError("inputs that a hospital cannot read stop the run before round 0:\n  "
                                  + "\n  ".join(problems))

    def state_config(self, h: str | None = None) -> dict:
        """Where and under which key a hospital saves its method state, and (per hospital) which
        round's state continues the run. Empty when nothing has to be saved."""
        if not self.saves_state:
            return {}
        cfg = {"state-key": self.run_key}
        if self.hospital_state_dir:
            cfg["state-dir"] = self.hospital_state_dir
        if h is not None:
            cfg["state-round"] = self.last_trained.get(h, 0)
        return cfg

    wants_entry = False  # whether train replies carry the window's statistics (the ODEx pool)
    wants_dice = False  # whether train replies carry the window's Dice before training (DiceEx on scores)

    def train_request(self, h: str, t: int, model: dict[str, np.ndarray], **extra) -> codec.Train:
        """A train message: the round, the hospital's task, its state key, the model to train."""
        return codec.Train(t, self.parts[h], model, self.state_config(h), want_entry=self.wants_entry,
                           want_dice=self.wants_dice, **extra)

    # ------------------------------------------------------------------ evaluation
    def deployed_per_hospital(self) -> bool:
        """Whether the model deployed at one hospital differs from the next one's, so that every hospital
        evaluates its own: yes under ``federation.norm: local`` (FedBN: each hospital deploys the global
        model with its own normalisation layers); no for the shared global model, with or without a
        test-time adaptation (``evaluation.adaptation``: it adapts the model to each test set, which
        depends on the domain only). A federation whose deployed system differs per hospital
        (personalised or per-hospital routed models) overrides this."""
        return self.sc.federation.norm == "local"

    def evaluation_plan(self) -> dict[str, list[str] | None]:
        """Evaluator → the domains it evaluates, in hospital order (None: every domain). Per-hospital
        models: every hospital, every domain; one deployed model: each domain once
        (:func:`~simlab.federated.eval_plan.assign_evaluators`, the same in every round)."""
        if self.deployed_per_hospital():
            return {h: None for h in self.ids}
        streams = {h.id: list(h.drift.referenced_domains()) for h in self.sc.hospitals}
        return assign_evaluators(self.sc.eval_domains, streams)

    def eval_requests(self, t: int, state: dict[str, np.ndarray], plan: dict[str, list[str] | None]
                      ) -> dict[str, codec.Evaluate]:
        """The ``evaluate`` message of each evaluator: the model, where its private state is only when
        the deployed model uses it, and the amplitude bank only when the adaptation reads it."""
        private, bank = self.deployed_per_hospital(), self.bank if self.eval_bank else None
        return {h: codec.Evaluate(t, self.parts[h], model=state, state=self.state_config(h) if private else {},
                                  domains=domains, bank=bank) for h, domains in plan.items()}

    def evaluate(self, t: int, state: dict[str, np.ndarray]) -> tuple[int, list[str]]:
        """Evaluate round t's deployed model(s) (:meth:`evaluation_plan`); the bytes sent down and the
        evaluators. Rows: one per evaluated domain × metric, under the evaluator's id when models are
        deployed per hospital, else under :data:`~simlab.runlog.SHARED`. An evaluator that fails (an
        error, or no reply before the timeout) gets an ``eval_failed`` row (its id, no domain), and its
        domains have no rows in round t: with a shared model they are missing (NaN) for every
        hospital in that round, never filled in from elsewhere."""
        plan = self.evaluation_plan()
        requests = self.eval_requests(t, state, plan)
        self._collect_eval(t, list(plan), self._send(codec.EVALUATE, list(plan), requests))
        return sum(codec.broadcast_nbytes(requests[h]) for h in plan), list(plan)

    def _collect_eval(self, t: int, evaluators: list[str], replies: dict[str, Message]) -> None:
        owner = None if self.deployed_per_hospital() else SHARED
        for h in evaluators:
            reply = replies.get(h)
            if reply is None or reply.has_error():
                reason = "no reply before the timeout" if reply is None else reply.error.reason
                log.warning("round %d: evaluation failed at %s: %s", t, h, reason)
                self.log.metric(t, h, None, "eval_failed", 1.0)
                continue
            for key, value in sorted(codec.decode_metrics(reply.content).items()):
                if "/" in key:
                    metric, domain = key.split("/", 1)
                    self.log.metric(t, owner or h, domain, metric, value)

    def timed_evaluation(self, t: int, state: dict[str, np.ndarray]) -> dict:
        """:meth:`evaluate`, with what rounds.jsonl records of it: ``eval_s`` (wall time),
        ``eval_bytes_down`` and ``evaluators``."""
        start = time.perf_counter()
        down, evaluators = self.evaluate(t, state)
        return {"eval_s": time.perf_counter() - start, "eval_bytes_down": down, "evaluators": evaluators}

    # ------------------------------------------------------------------ training
    def train_replies(self, t: int, targets: list[str], requests: dict[str, codec.Train]
                      ) -> tuple[dict[str, Message], list[str]]:
        """Send ``train`` and keep the good replies (hospital order); failures are logged and listed."""
        replies = self._send(codec.TRAIN, targets, requests)
        ok, failed = {}, []
        for h in targets:
            reply = replies.get(h)
            if reply is None or reply.has_error():
                reason = "no reply before the timeout" if reply is None else reply.error.reason
                log.warning("round %d: %s failed: %s", t, h, reason)
                self.log.metric(t, h, self.domains[h][t - 1], "train_failed", 1.0)
                failed.append(h)
            else:
                ok[h] = reply
        return ok, failed

    def sample(self, t: int) -> list[str]:
        """Hospitals of round t: a seeded sample of those that participate, in hospital order."""
        k = self.sc.federation.clients_per_round or len(self.trainers)
        chosen = sorted(rng(self.sc.seed, "sample", t).choice(len(self.trainers), size=k, replace=False).tolist())
        return [self.trainers[i] for i in chosen]

    def setup_model(self, model, state: dict[str, np.ndarray]) -> None:
        """Hook for methods that keep more than one model on the server."""

    def share_amplitudes(self, t: int) -> int:
        """FedDG bank: every hospital that participates shares low-frequency amplitude blocks (never
        images or phases); the server keeps the latest blocks of each and sends the bank with every
        train message."""
        requests = {h: codec.Query(t, self.parts[h]) for h in self.trainers}
        up = 0
        for h, reply in self._send(codec.BANK, self.trainers, requests).items():
            if reply.has_error():
                log.warning("round %d: %s shared no amplitude blocks: %s", t, h, reply.error.reason)
                continue
            self.bank[h] = codec.decode_bank(reply.content)
            up += self.bank[h].nbytes
        return up

    def train_round(self, t: int, state: dict[str, np.ndarray], keys: set[str]) -> tuple[dict, dict]:
        fed = self.sc.federation
        targets = self.sample(t)
        bank, bank_bytes = None, 0
        freq = self.sc.augmentation
        if freq.frequency.enabled or self.eval_bank:
            if not self.bank or (freq.frequency_refresh and (t - 1) % freq.frequency_refresh == 0):
                bank_bytes += self.share_amplitudes(t)
            bank = self.bank if freq.frequency.enabled else None  # sent for training only to augment
        requests = {h: self.train_request(h, t, state, bank=bank) for h in targets}
        replies, failed = self.train_replies(t, targets, requests)
        shared = {k: v for k, v in state.items() if k not in self.local}  # all of it unless FedBN
        entries, up = [], 0
        for h, reply in replies.items():
            r = codec.decode_train_reply(reply.content, like=shared)
            self.last_trained[h] = t
            up += state_nbytes(r.model)
            self.log.metric(t, h, self.domains[h][t - 1], "train_loss", r.metrics["train_loss"])
            entries.append((h, r.model, int(r.metrics["num-examples"])))
        cost = {"sent": targets, "replied": [e[0] for e in entries], "failed": failed,
                "bytes_down": sum(codec.broadcast_nbytes(requests[h]) for h in targets),
                "bytes_up": up + bank_bytes, "bytes_bank": bank_bytes}
        if len(entries) < fed.min_replies:
            log.warning("round %d skipped: %d replies < min_replies %d", t, len(entries), fed.min_replies)
            cost["skipped"] = True
            return state, cost
        try:
            result = aggregate(entries, fed.aggregation, trainable_keys=keys - self.local, reference=shared)
        except EmptyAggregation as exc:
            log.warning("round %d skipped: %s", t, exc)
            cost["skipped"] = True
            return state, cost
        for h, reason in result.rejected.items():
            log.warning("round %d: update of %s rejected: %s", t, h, reason)
            self.log.metric(t, h, self.domains[h][t - 1], "update_rejected", 1.0)
        for h, w in result.weights.items():
            self.log.metric(t, h, self.domains[h][t - 1], "agg_weight", w)
        return self.server_step(state, {k: result.model.get(k, v) for k, v in state.items()}, keys - self.local), cost

    def server_step(self, state: dict[str, np.ndarray], new: dict[str, np.ndarray], keys: set[str]
                    ) -> dict[str, np.ndarray]:
        """With ``federation.server_optimizer``, the aggregate ``new`` is a pseudo-gradient from the model
        sent (``state``): the optimiser steps the trainable parameters ``keys``; every other array (running
        statistics, counters) keeps the aggregate. Without one, ``new`` is the new model."""
        if self.server_opt is None:
            return new
        return self.server_opt.apply(self.opt_state, state, new, keys)

    # ------------------------------------------------------------------ checkpoints
    def snapshot(self, state: dict[str, np.ndarray]) -> tuple[dict, dict[str, np.ndarray]]:
        """What the server needs to continue after round t (subclasses add their own)."""
        arrays = {**flat("model", state), **flat("bank", self.bank)}
        if self.server_opt is not None:
            arrays.update(flat("server_opt", self.opt_state.to_arrays()))
        return {"last_trained": self.last_trained}, arrays

    def restore(self, meta: dict, arrays: dict[str, np.ndarray], state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.last_trained = {h: int(t) for h, t in meta["last_trained"].items()}
        self.bank = nest(arrays, "bank")
        self.opt_state = OptState.from_arrays(nest(arrays, "server_opt"))
        restored = nest(arrays, "model")
        if list(restored) != list(state) or any(restored[k].shape != v.shape for k, v in state.items()):
            raise CheckpointError(f"{self.ckpt}: its model does not match the scenario's model")
        return restored

    def save(self, t: int, state: dict[str, np.ndarray], started: float) -> None:
        """Checkpoint after round t (t = -1: the arm's start, before any row was written)."""
        if self.ckpt is None:
            return
        meta, arrays = self.snapshot(state) if t >= 0 else ({}, {})
        meta.update(round=t, arm=self.log.arm, rounds=self.sc.federation.rounds, settings=settings_hash(self.sc),
                    run_key=self.run_key, elapsed_s=self.elapsed + time.perf_counter() - started,
                    **self.log.sizes())
        save_checkpoint(self.ckpt, meta, arrays)

    def load(self, state: dict[str, np.ndarray]) -> tuple[int, dict[str, np.ndarray]]:
        """Resume: (last completed round, state) from the arm's checkpoint; (-1, state) if none."""
        if self.ckpt is None:
            raise CheckpointError(f"arm {self.log.arm}: output.checkpoint is off, so there is nothing to resume from")
        if not self.ckpt.exists():
            return -1, state
        meta, arrays = load_checkpoint(self.ckpt)
        expected = {"arm": self.log.arm, "rounds": self.sc.federation.rounds, "settings": settings_hash(self.sc)}
        for key, value in expected.items():
            if meta.get(key) != value:
                raise CheckpointError(f"{self.ckpt}: written for {key}={meta.get(key)!r}, but this run has "
                                      f"{key}={value!r}; a run resumes only with the scenario it started with")
        self.log.rewind(meta["metrics_bytes"], meta["rounds_bytes"])
        self.run_key, self.elapsed = meta["run_key"], float(meta["elapsed_s"])
        t = int(meta["round"])
        if t >= 0:
            state = self.restore(meta, arrays, state)
        log.info("arm %s: resuming after round %d (checkpoint %s)", self.log.arm, t, self.ckpt)
        return t, state

    # ------------------------------------------------------------------ the run
    def run(self) -> dict[str, np.ndarray]:
        sc = self.sc
        started = time.perf_counter()
        seed_everything(derive_seed(sc.seed, "init"))
        model = build_model(sc.model, sc.num_classes)
        state, keys = state_to_numpy(model), trainable_keys(model)
        self.local = set(norm_state_keys(model)) if sc.federation.norm == "local" else set()
        self.setup_model(model, state)
        done, state = self.load(state) if self.resume else (-1, state)
        if done < 0:
            self.run_key = f"{self.log.arm}-{secrets.token_hex(6)}"  # names this run's saved hospital state
            self.save(-1, state, started)
        self.identify()
        log.info("%d hospitals connected and identified", len(self.node_of))
        eval_at = set(evaluation_rounds(sc))
        if done < 0:
            start = time.perf_counter()
            # an adaptation that reads the bank needs it before round 1 would share it: the first windows' blocks
            shared = self.share_amplitudes(1) if self.eval_bank and not self.bank else 0
            ev = self.timed_evaluation(0, state)
            self.log.round_cost(0, wall_time_s=time.perf_counter() - start, evaluated=True,
                                bytes_down=ev["eval_bytes_down"],
                                **({"bytes_up": shared, "bytes_bank": shared} if shared else {}), **ev)
            self.save(0, state, started)
        for t in range(max(done, 0) + 1, sc.federation.rounds + 1):
            start = time.perf_counter()
            state, cost = self.train_round(t, state, keys)
            cost["train_s"] = time.perf_counter() - start
            if t in eval_at:
                cost.update(self.timed_evaluation(t, state))
                cost["bytes_down"] += cost["eval_bytes_down"]
            self.log.round_cost(t, wall_time_s=time.perf_counter() - start, evaluated=t in eval_at, **cost)
            self.save(t, state, started)
        return state
