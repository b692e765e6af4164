"""The ODEx model pool at the server, without Flower: members, their histories, and what a round
does to them — first-round grouping, the ablations' decisions (oracle, DiceEx), aggregation per
member, forks (merged when their statistics agree, capped), the oracle member of each true domain
for evaluation, and the pool's checkpoint. :mod:`simlab.federated.odex_server` only moves messages.

True domains enter here for bookkeeping only (``trained_on``: which member trained on which domain,
for the oracle evaluation and the oracle-expansion ablation); the detection never reads them.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from simlab.aggregation.server_opt import OptState, ServerOptimizer
from simlab.checkpoint import flat, nest
from simlab.continual.odex import Decision, Entry, OdexParams, cluster_entries, decide, merge_entries

log = logging.getLogger("simlab")

State = dict[str, np.ndarray]


@dataclass
class Member:
    id: int
    state: State
    history: list[Entry] = field(default_factory=list)
    parent: int | None = None
    born: int = 0
    trained_on: Counter = field(default_factory=Counter)  # true domain → rounds (evaluation only)
    last_dice: dict[str, float] = field(default_factory=dict)  # DiceEx: hospital → Dice


@dataclass
class Update:
    """One hospital's reply in a round: its trained model, example count and window statistics."""

    hospital: str
    model: State
    n: int
    entry: Entry
    domain: str  # the window's true domain (bookkeeping only)


# aggregate(updates, reference) -> the combined model, or None when nothing survived the checks
Aggregate = Callable[[list[Update], State], State | None]
# record(hospital, domain, metric, value): a row of metrics.jsonl
Record = Callable[[str, str, str, float], None]


class Pool:
    def __init__(self, params: OdexParams, init_state: State, hospitals: list[str],
                 server_opt: ServerOptimizer | None = None, opt_keys: set[str] | frozenset = frozenset()):
        self.params = params
        self.server_opt, self.opt_keys = server_opt, set(opt_keys)  # see _step
        self.opt: dict[int, OptState] = {}  # member → its server optimiser state
        self.members: dict[int, Member] = {0: Member(0, init_state)}
        self.next_id = 1
        self.current = {h: 0 for h in hospitals}  # member each hospital trained last
        self.last_domain: dict[str, str] = {}  # oracle ablation only

    def __len__(self) -> int:
        return len(self.members)

    def histories(self) -> dict[int, list[Entry]]:
        return {m: mem.history for m, mem in self.members.items() if mem.history}

    def _new(self, state: State, history: list[Entry], parent: int | None, t: int) -> Member:
        m = Member(self.next_id, state, history, parent=parent, born=t)
        self.members[m.id] = m
        self.next_id += 1
        return m

    def add_member(self, state: State, t: int) -> Member:
        """A member with an empty history (first round: a group of hospitals unlike the first)."""
        return self._new(state, [], None, t)

    def add_fork(self, parent: int, state: State, entry: Entry, t: int) -> Member:
        base = list(self.members[parent].history) if self.params.fork_history == "inherit" else []
        return self._new(state, base + [entry], parent, t)

    # ------------------------------------------------------------------ decisions
    def decide_detect(self, per_member: dict[int, np.ndarray]) -> Decision:
        """``per_member``: member id → per-entry window scores (mean û); see :func:`decide`."""
        return decide(per_member, {m: self.members[m].history for m in per_member}, self.params.shift)

    def first_round(self, hospitals: list[str], entries: list[Entry], t: int) -> dict[str, Decision]:
        """No history yet: hospitals whose windows agree share the initial member; every other group
        becomes a member of its own, started from the same initial model (not counted as forks)."""
        decisions = {h: Decision(0, False) for h in hospitals}
        state = self.members[0].state
        for i, group in enumerate(cluster_entries(entries, self.params.shift)):
            if i > 0 and len(self) < self.params.max_members:
                member = self.add_member({k: v.copy() for k, v in state.items()}, t)
                for j in group:
                    decisions[hospitals[j]] = Decision(member.id, False)
        return decisions

    def oracle_decisions(self, domains_now: dict[str, str]) -> dict[str, Decision]:
        """Oracle-expansion ablation: fork exactly when a hospital's true domain changed."""
        return {h: Decision(self.current[h], h in self.last_domain and self.last_domain[h] != d)
                for h, d in domains_now.items()}

    def dice_decision(self, h: str, dice: float, member: int | None = None) -> Decision:
        """DiceEx: fork when the Dice of ``member`` (default: the hospital's current one) on the new
        window dropped by more than ``dice_drop`` (relative) below its last value at this hospital."""
        m = self.current[h] if member is None else member
        last = self.members[m].last_dice.get(h)
        self.members[m].last_dice[h] = dice
        return Decision(m, last is not None and dice < (1 - self.params.dice_drop) * last)

    # ------------------------------------------------------------------ a round
    def apply(self, t: int, decisions: dict[str, Decision], updates: list[Update], aggregate: Aggregate,
              record: Record) -> None:
        """Per member, aggregate its updates and add the round's merged entries to its history; forks
        first (same-round forks of a parent merge when their statistics agree; at the cap the update
        goes to the parent). ``updates`` in hospital order."""
        groups: dict[int, list[Update]] = defaultdict(list)
        forks: dict[int, list[Update]] = defaultdict(list)
        for u in updates:
            d = decisions[u.hospital]
            (forks if d.fork else groups)[d.member].append(u)
        self._forks(t, forks, groups, aggregate, record)
        for m, items in groups.items():
            member = self.members[m]
            new = aggregate(items, member.state)
            if new is None:
                continue
            member.state = self._step(self._opt_of(m), member.state, new)
            member.history.extend(self._entries(items))
            for u in items:
                member.trained_on[u.domain] += 1
                self._trained(u, m, record)

    def _entries(self, items: list[Update]) -> list[Entry]:
        """This round's history entries of one member: agreeing hospitals' statistics merged exactly."""
        entries = [u.entry for u in items]
        return [merge_entries([entries[i] for i in g]) for g in cluster_entries(entries, self.params.shift)]

    def _trained(self, u: Update, m: int, record: Record) -> None:
        self.current[u.hospital] = m
        self.last_domain[u.hospital] = u.domain
        record(u.hospital, u.domain, "member", m)

    def _forks(self, t: int, forks: dict[int, list[Update]], groups: dict[int, list[Update]], aggregate: Aggregate,
               record: Record) -> None:
        for parent, items in sorted(forks.items()):
            if self.params.merge_forks:
                clusters = [[items[i] for i in g] for g in cluster_entries([u.entry for u in items], self.params.shift)]
            else:
                clusters = [[u] for u in items]
            for cluster in clusters:
                if len(self) >= self.params.max_members:
                    for u in cluster:
                        record(u.hospital, u.domain, "fork_refused", 1.0)
                    groups[parent].extend(cluster)  # the update goes to the parent
                    continue
                new = aggregate(cluster, self.members[parent].state)
                if new is None:
                    continue
                opt = None if self.server_opt is None else self._opt_of(parent).copy()
                new = self._step(opt, self.members[parent].state, new)
                first, *rest = self._entries(cluster)
                member = self.add_fork(parent, new, first, t)
                if opt is not None:
                    self.opt[member.id] = opt
                member.history.extend(rest)
                for u in cluster:
                    member.trained_on[u.domain] += 1
                    record(u.hospital, u.domain, "fork", member.id)
                    self._trained(u, member.id, record)
                log.info("round %d: member %d forked from %d by %s", t, member.id, parent,
                         ", ".join(u.hospital for u in cluster))

    # ------------------------------------------------------------------ server optimiser, per member
    def _opt_of(self, m: int) -> OptState | None:
        """Member m's server optimiser state (a member starts with a fresh one, m = v = 0)."""
        return None if self.server_opt is None else self.opt.setdefault(m, OptState())

    def _step(self, opt: OptState | None, reference: State, new: State) -> State:
        """``federation.server_optimizer`` per member: the member's aggregate ``new`` is a pseudo-gradient
        from the model its hospitals were sent (``reference``), stepped on the trainable keys with the
        member's own m and v (:mod:`simlab.aggregation.server_opt`). A fork starts from a copy of its
        parent's state: its first aggregate is a step from the parent's model, so it continues the
        parent's trajectory rather than restarting the adaptive step scale (a fresh Adam's first steps
        are ≈ ±η on every coordinate) just when it meets a new domain. First-round members and member 0
        start fresh."""
        return new if opt is None else self.server_opt.apply(opt, reference, new, self.opt_keys)

    # ------------------------------------------------------------------ evaluation
    def oracle(self) -> dict[str, int]:
        """Per true domain, the member that trained on it most often (evaluation only)."""
        best: dict[str, tuple[int, int]] = {}
        for m, member in sorted(self.members.items()):
            for d, n in member.trained_on.items():
                if d not in best or n > best[d][0]:
                    best[d] = (n, m)
        return {d: m for d, (n, m) in best.items()}

    # ------------------------------------------------------------------ checkpoints
    def snapshot(self) -> tuple[dict, dict[str, np.ndarray]]:
        members, arrays = [], {}
        for m, mem in self.members.items():
            members.append({"id": m, "parent": mem.parent, "born": mem.born, "history": len(mem.history),
                            "trained_on": list(mem.trained_on.items()), "last_dice": list(mem.last_dice.items())})
            arrays.update(flat(f"m{m}", mem.state))
            for i, e in enumerate(mem.history):
                arrays.update(flat(f"m{m}.h{i}", e.to_arrays()))
        meta = {"members": members, "next_id": self.next_id, "current": self.current, "last_domain": self.last_domain}
        for m, opt in self.opt.items():
            arrays.update(flat(f"opt{m}", opt.to_arrays()))
        meta["opt"] = sorted(self.opt)
        return meta, arrays

    def restore(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        self.members = {}
        for info in meta["members"]:
            m = int(info["id"])
            history = [Entry.from_arrays(nest(arrays, f"m{m}.h{i}")) for i in range(info["history"])]
            self.members[m] = Member(m, nest(arrays, f"m{m}"), history, parent=info["parent"], born=info["born"],
                                     trained_on=Counter(dict(info["trained_on"])), last_dice=dict(info["last_dice"]))
        self.next_id = int(meta["next_id"])
        self.current = {h: int(m) for h, m in meta["current"].items()}
        self.last_domain = dict(meta["last_domain"])
        self.opt = {int(m): OptState.from_arrays(nest(arrays, f"opt{m}")) for m in meta.get("opt", [])}
