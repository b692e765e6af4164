"""The ServerApp side of federated ODEx: a pool of members, per-hospital score → train → aggregate.

A round: (1) every sampled hospital scores its new window against every member's history (only
histories with their first-block weights travel, and the one member the hospital trained last) and
the member with the lowest score / threshold is chosen. The ablations change when to fork: at true
boundaries (oracle) or on a Dice drop (DiceEx); with ``selection: scores`` (the paper's) the member is
still chosen by the scores and the train reply carries the chosen member's Dice on the window before
training, with ``selection: current`` the hospital's last member is trained and DiceEx asks for its
Dice first (``query.dice``); (2) each hospital trains its
chosen member, or a fork of it, and returns the model and the sufficient statistics of its window.
Steps (1) and (2) share one ``train`` message unless the window belongs to another member than the
one sent (:meth:`OdexFederation.train_scored`); in the first round, with no history yet, every
hospital trains the initial model and the server groups the returned window statistics into the
first members (:meth:`OdexFederation.first_round`); (3) per member, the updates are aggregated with
the configured rule and the window statistics become one new history entry; same-round forks of one
parent merge when their statistics agree; the pool is capped. Evaluation sends the whole pool and
routes every test image to its closest member; the routed pool is the same at every hospital, so each
test domain is evaluated once (rows under hospital 'all'). Rows written: pool_size (hospital
'server'), member and shift_ratio per hospital, fork (value = new member id), fork_refused.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from simlab.continual.odex import Decision, Entry
from simlab.continual.odex_pool import Pool, Update
from simlab.continual.odex_features import first_block_keys
from simlab.aggregation import EmptyAggregation, aggregate
from simlab.federated import codec
from simlab.federated.codec import histories_nbytes, state_nbytes
from simlab.federated.federation import Federation
from simlab.models.unet import trainable_keys
from simlab.runlog import SERVER

log = logging.getLogger("simlab")


class OdexFederation(Federation):
    wants_entry = True  # every train reply carries the window's statistics under the model sent

    def setup_model(self, model: torch.nn.Module, state: dict[str, np.ndarray]) -> None:
        self.params = self.sc.continual.odex
        sample = torch.zeros(1, 1, self.sc.data.image_size, self.sc.data.image_size)
        self.fb_keys = first_block_keys(model, self.params.features, sample)
        self.pool = Pool(self.params, state, self.ids, server_opt=self.server_opt, opt_keys=trainable_keys(model))
        self.scored = self.params.expansion == "detect" or self.params.selection == "scores"
        self.wants_dice = self.scored and self.params.expansion == "dice"

    def first_block(self, m: int) -> dict[str, np.ndarray]:
        return {k: self.pool.members[m].state[k] for k in self.fb_keys}

    # ------------------------------------------------------------------ checkpoints
    def snapshot(self, state):
        meta, arrays = super().snapshot(state)
        meta["pool"], pool_arrays = self.pool.snapshot()
        return meta, {**arrays, **pool_arrays}

    def restore(self, meta, arrays, state):
        state = super().restore(meta, arrays, state)
        self.pool.restore(meta["pool"], arrays)
        return state

    # ------------------------------------------------------------------ decisions
    def fork_rule(self, t: int, chosen: dict[str, Decision], replies: dict) -> dict[str, Decision]:
        """When to fork, for members chosen by the scores: detect (ODEx) keeps the scores' decision;
        oracle forks at the hospital's true boundaries; DiceEx when the chosen member's Dice on the
        window (returned with the update) dropped by more than ``dice_drop`` below its last value there."""
        if self.params.expansion == "detect":
            return chosen
        if self.params.expansion == "oracle":
            truth = self.pool.oracle_decisions({h: self.domains[h][t - 1] for h in chosen})
            return {h: Decision(d.member, truth[h].fork, d.ratio) for h, d in chosen.items()}
        out = {}
        for h, d in chosen.items():
            dice = codec.decode_metrics(replies[h].content)["window_dice"]
            self.log.metric(t, h, self.domains[h][t - 1], "window_dice", dice)
            out[h] = Decision(d.member, self.pool.dice_decision(h, dice, d.member).fork, d.ratio)
        return out

    def decide(self, t: int, targets: list[str]) -> tuple[dict[str, Decision], int, int]:
        """The ablations' decisions with ``selection: current``: oracle expansion (true boundaries) or
        DiceEx (``query.dice``), for the member each hospital trained last."""
        if self.params.expansion == "oracle":
            return self.pool.oracle_decisions({h: self.domains[h][t - 1] for h in targets}), 0, 0
        requests = {h: codec.Query(t, self.parts[h], self.pool.members[self.pool.current[h]].state) for h in targets}
        replies = self._send(codec.DICE, targets, requests)
        out = {}
        for h in targets:
            reply = replies.get(h)
            if reply is None or reply.has_error():
                out[h] = Decision(self.pool.current[h], False)
                continue
            dice = codec.decode_metrics(reply.content)["dice"]
            out[h] = self.pool.dice_decision(h, dice)
            self.log.metric(t, h, self.domains[h][t - 1], "window_dice", dice)
        return out, len(targets) * state_nbytes(self.pool.members[0].state), 0

    def first_round(self, t: int, targets: list[str]):
        """Detect mode, first round: nothing to score against yet. Every hospital trains the initial
        model and, as in every round, returns the statistics of its window under the model it
        received. Hospitals whose windows agree share the initial member; every other group becomes a
        member of its own, started from the same initial model (not counted as forks). Training a copy
        of the initial model is training the initial model, so no message is needed before training.
        Returns (decisions, replies, failed, bytes down, timing) like :meth:`train_scored`."""
        state = self.pool.members[0].state
        replies, failed = self.train_replies(t, targets, {h: self.train_request(h, t, state) for h in targets})
        ok = list(replies)
        entries = [codec.decode_entry(replies[h].content, self.first_block(0)) for h in ok]  # models: later
        decisions = self.pool.first_round(ok, entries, t)
        return decisions, replies, failed, len(targets) * state_nbytes(state), {}

    # ------------------------------------------------------------------ a round
    def train_round(self, t: int, state, keys: set[str]) -> tuple[dict, dict]:
        fed = self.sc.federation
        targets = self.sample(t)
        if self.scored:
            hist = self.pool.histories()
            decisions, replies, failed, down, timing = (self.train_scored(t, targets, hist) if hist
                                                        else self.first_round(t, targets))
            decisions = self.fork_rule(t, decisions, replies)
            up = 0
        else:  # oracle / DiceEx expansion for the hospital's last member
            start = time.perf_counter()
            decisions, q_down, up = self.decide(t, targets)
            timing = {"query_s": time.perf_counter() - start}
            requests = {h: self.train_request(h, t, self.pool.members[decisions[h].member].state) for h in targets}
            replies, failed = self.train_replies(t, targets, requests)
            down = q_down + sum(state_nbytes(self.pool.members[decisions[h].member].state) for h in targets)
        fb = {m: self.first_block(m) for m in self.pool.members}
        updates = []
        for h, reply in replies.items():
            self.last_trained[h] = t
            r = codec.decode_train_reply(reply.content, state, fb[decisions[h].member])
            up += state_nbytes(r.model) + codec.entry_nbytes(reply.content)
            self.log.metric(t, h, self.domains[h][t - 1], "train_loss", r.metrics["train_loss"])
            updates.append(Update(h, r.model, int(r.metrics["num-examples"]), r.entry, self.domains[h][t - 1]))
        cost = {"sent": targets, "failed": failed, **timing, "bytes_down": down, "bytes_up": up}
        if len(updates) < fed.min_replies:
            log.warning("round %d skipped: %d replies < min_replies %d", t, len(updates), fed.min_replies)
            cost["skipped"] = True
            return state, cost
        self.pool.apply(t, decisions, updates, lambda items, ref: self._aggregate(t, items, keys, ref),
                        lambda h, domain, metric, value: self.log.metric(t, h, domain, metric, value))
        self.log.metric(t, SERVER, None, "pool_size", len(self.pool))
        cost["pool_size"] = len(self.pool)
        return state, cost

    def train_scored(self, t: int, targets: list[str], hist: dict[int, list[Entry]]):
        """Detect mode, one message per hospital and round in the common case: the ``train`` message
        carries every member's history (no models) and the member the hospital trained last. The
        hospital scores its window under every history, decides as the server does (:func:`decide`)
        and, when that member is the one to train or to fork, trains it at once, returning its window
        scores with the update. A hospital whose window belongs to another member returns only its
        scores and gets a second ``train`` message with that member. The server always takes the
        decision from the returned scores itself. Returns (decisions, replies, failed, bytes down,
        timing), timing ``score_s`` being the longest scoring time at a hospital."""
        def request(h: str, m: int, with_histories: bool) -> codec.Train:
            return self.train_request(h, t, self.pool.members[m].state, member=m,
                                      histories=hist if with_histories else None)

        first, failed = self.train_replies(t, targets, {h: request(h, self.pool.current[h], True) for h in targets})
        decisions, score_s, trained = {}, 0.0, {}
        for h, reply in first.items():
            shift = codec.decode_shift(reply.content)
            decisions[h] = self.pool.decide_detect(codec.window_scores(shift))
            score_s = max(score_s, float(shift["score_s"]))
            trained[h] = "arrays" in reply.content
            self.log.metric(t, h, self.domains[h][t - 1], "shift_ratio", decisions[h].ratio)
        again = [h for h, d in decisions.items() if d.member != self.pool.current[h] or not trained[h]]
        replies = {h: r for h, r in first.items() if h not in again}
        if again:
            second, failed2 = self.train_replies(t, again, {h: request(h, decisions[h].member, False) for h in again})
            replies.update(second)
            failed = sorted(failed + failed2, key=self.ids.index)
        down = (len(targets) * histories_nbytes(hist)
                + sum(state_nbytes(self.pool.members[self.pool.current[h]].state) for h in targets)
                + sum(state_nbytes(self.pool.members[decisions[h].member].state) for h in again))
        replies = dict(sorted(replies.items(), key=lambda kv: self.ids.index(kv[0])))
        return decisions, replies, failed, down, {"score_s": score_s}

    def _aggregate(self, t: int, items: list[Update], keys: set[str], reference) -> dict[str, np.ndarray] | None:
        try:
            result = aggregate([(u.hospital, u.model, u.n) for u in items], self.sc.federation.aggregation,
                               trainable_keys=keys, reference=reference)
        except EmptyAggregation as exc:
            log.warning("round %d: %s", t, exc)
            return None
        for h, reason in result.rejected.items():
            self.log.metric(t, h, self.domains[h][t - 1], "update_rejected", 1.0)
            log.warning("round %d: update of %s rejected: %s", t, h, reason)
        for h, w in result.weights.items():
            self.log.metric(t, h, self.domains[h][t - 1], "agg_weight", w)
        return result.model

    # ------------------------------------------------------------------ evaluation
    def deployed_per_hospital(self) -> bool:
        """No: the deployed system is the whole pool, and routing a test image reads only the pool and
        the image (:meth:`simlab.hospital.Hospital.evaluate_pool`), never the hospital, so the pool is
        evaluated once per domain like a shared model."""
        return False

    def eval_requests(self, t: int, state, plan: dict[str, list[str] | None]) -> dict[str, codec.Evaluate]:
        """The pool (members, histories, the oracle's member per domain) to every evaluator, with its domains."""
        members = {m: mem.state for m, mem in self.pool.members.items()}
        histories, oracle = self.pool.histories(), self.pool.oracle()
        return {h: codec.Evaluate(t, self.parts[h], members=members, histories=histories, oracle=oracle,
                                  domains=domains) for h, domains in plan.items()}
