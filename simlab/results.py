"""From evaluation rows to accuracy matrices and continual-learning metrics (no Flower here).

Per hospital: stages are the maximal runs of rounds with one true domain in that hospital's stream
(an A→B→A stream has 3 stages); for gradual and population drift a stage starts where the transition
towards its domain starts (:func:`change_start`), not where its domain becomes the majority, so the
previous stage ends with the last round before the transition and its R row is a true zero-shot row.
``R[i][j]`` = Dice of the deployed model on stage j's domain test set, evaluated after the last round of
stage i; ``b[j]`` = the untrained model (round 0) on that domain.

Pooled (federation level): the named domains grouped by the round in which they first contribute to
a window of any stream (domains that start together form one group, e.g. ``A+B``); stage i ends the
round before the next group first contributes (the last stage ends with the run); ``R[i][j]`` = mean
over hospitals and over group j's domains of the Dice at the end of stage i. The arm-level ``acc``,
``bwt``, ``fwt`` (the ODEx paper's), ``gem_fwt`` and ``chaudhry_forgetting`` in ``summary.json`` come
from this pooled matrix.

Headline forgetting (``forgetting``, positive = Dice lost): not read from R, whose pooled stages mix
departed domains with domains still being trained. For every test domain that has left every stream
before the end (:func:`departures`), the Dice after the last round it contributed to a window minus the
Dice at the end, mean over hospitals of each one's deployed model; the headline is the mean of these
differences clipped at 0 (:func:`simlab.metrics.continual.departure_forgetting`), with the signed ones
in ``forgetting_by_domain``. Per hospital the same over the domains that left that hospital's stream,
with its own deployed model. Each hospital's values are under ``per_hospital``.

Every registered segmentation metric (:mod:`simlab.metrics.registry`) gets the same matrices from its
own rows, in ``metrics.<name>`` (:func:`metric_block`): ``mean`` (the GEM ACC formula), ``bwt``,
``fwt``, ``gem_fwt``, ``chaudhry_forgetting`` and ``forgetting`` oriented by the metric's better
direction, so that for every metric positive BWT/FWT = better and positive forgetting = got worse. Dice
stays the headline: its block repeats the arm-level numbers.

:func:`metric_rounds` lists the rounds all of this reads; the federation evaluates them.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from simlab.data.drift import contribution_span, plan, true_domains
from simlab.metrics.continual import (FORGETTING_LABELS, METRIC_LABELS, Stage, all_metrics, build_R,
                                      chaudhry_forgetting, departure_forgetting, gem_acc, gem_bwt, gem_fwt,
                                      initial_scores, odex_fwt, stages_from_domains)
from simlab.metrics.registry import HEADLINE, REGISTRY, metric_labels
from simlab.runlog import SHARED
from simlab.scenario.schema import Scenario


class DiceTable:
    """value[(round, hospital, domain)] of one metric for one arm, from metrics.jsonl rows ('dice' unless told).

    A model deployed identically at every hospital is evaluated once per domain, its rows under
    hospital :data:`~simlab.runlog.SHARED`; :meth:`at` reads those as the value of every hospital
    without a row of its own, so each hospital's R is built from the model deployed there."""

    def __init__(self, rows: list[dict], metric: str = "dice"):
        self.values: dict[tuple[int, str, str], float] = {}
        for r in rows:
            if r["metric"] == metric:
                v = r["value"]
                self.values[(r["round"], r["hospital"], r["domain"])] = math.nan if v is None else float(v)

    def at(self, t: int, hospital: str, domain: str) -> float:
        """The hospital's own value, else the shared model's, else NaN (not evaluated, or failed)."""
        own = self.values.get((t, hospital, domain))
        return self.values.get((t, SHARED, domain), math.nan) if own is None else own

    def mean_over(self, t: int, hospitals: list[str], domain: str) -> float:
        vals = [self.at(t, h, domain) for h in hospitals]
        return float(np.mean(vals)) if vals else math.nan


def _drift(scenario: Scenario, hospital_id: str):
    return next(h for h in scenario.hospitals if h.id == hospital_id).drift


def majority_stages(scenario: Scenario, hospital_id: str) -> list[Stage]:
    """A hospital's stages by true (majority) domain, each starting where its domain becomes the majority:
    the boundaries that shift detection (:func:`pool_events`) is measured against."""
    return stages_from_domains(true_domains(_drift(scenario, hospital_id), scenario.federation.rounds), first_round=1)


def hospital_stages(scenario: Scenario, hospital_id: str) -> list[Stage]:
    """The stages of a hospital's R: its :func:`majority_stages`, each later one starting where the change
    towards its domain starts (:func:`change_start`) and the one before ending the round before. Abrupt
    and recurring drift: the majority stages. Gradual and population drift: the stage before the
    transition ends with its last pure (or unchanged) round, so its R row is zero-shot on the new domain."""
    drift = _drift(scenario, hospital_id)
    stages = majority_stages(scenario, hospital_id)
    out = stages[:1]
    for st in stages[1:]:
        start = change_start(drift, out[-1], st)
        out[-1] = out[-1]._replace(last_round=start - 1)
        out.append(st._replace(first_round=start))
    return out


def change_start(drift, before: Stage, stage: Stage) -> int:
    """First round of the change from ``before`` to ``stage``: walking back from the round the new domain
    becomes the majority, the first round after one that still has the previous stage's pure domain or
    the same window distribution as the round before it. The boundary itself for abrupt changes, the
    start of the transition for gradual and population drift; ``before`` keeps at least its first round."""
    t = stage.first_round
    while t - 1 > before.first_round:
        p = plan(drift, t - 1)
        if (p.interpolate is None and p.weights == {before.domain: 1.0}) or p == plan(drift, t - 2):
            break
        t -= 1
    return t


def training_hospitals(scenario: Scenario) -> list:
    """The hospitals whose windows train the federation's models: a site with ``participates: false``
    only tests, so its stream's domains are test domains of the federation, not stages it learns (its
    own per-hospital block still follows its stream)."""
    return [h for h in scenario.hospitals if h.participates]


def pooled_stages(scenario: Scenario) -> tuple[list[Stage], dict[str, list[str]]]:
    """Federation-level stages: named domains grouped by the round they first contribute to a training
    window of any participating hospital's stream (:func:`simlab.data.drift.contribution_span`).

    Returns the stages (``domain`` = the group's label, e.g. ``A+B`` when A and B start together) and
    the group label → domains map."""
    T = scenario.federation.rounds
    first: dict[str, int] = {}
    for h in training_hospitals(scenario):
        for d, (a, _) in contribution_span(h.drift, T).items():
            first[d] = min(first.get(d, a), a)
    starts = sorted(set(first.values()))
    groups = {"+".join(d for d in first if first[d] == r): [d for d in first if first[d] == r] for r in starts}
    stages = [Stage(i, label, starts[i], (starts[i + 1] - 1) if i + 1 < len(starts) else T)
              for i, label in enumerate(groups)]
    return stages, groups


def departures(scenario: Scenario, hospital_id: str | None = None) -> dict[str, int]:
    """``L_d`` of every domain that left every participating hospital's stream (with ``hospital_id``: that
    hospital's stream) before the last round T: the last round in which it contributes to a training
    window. A domain fading out
    of a gradual or population transition contributes until its weight reaches 0."""
    T = scenario.federation.rounds
    last: dict[str, int] = {}
    for h in (training_hospitals(scenario) if hospital_id is None else scenario.hospitals):
        if hospital_id is None or h.id == hospital_id:
            for d, (_, b) in contribution_span(h.drift, T).items():
                last[d] = max(last.get(d, b), b)
    return {d: L for d, L in last.items() if L < T}


def metric_rounds(scenario: Scenario) -> set[int]:
    """The rounds after which the R matrices and the headline forgetting read evaluations: the last round
    of every hospital's and every pooled stage, and every hospital's ``L_d`` (:func:`departures`; the
    federation's ``L_d`` is one of them). Round 0 (the untrained model, ``b``) is not included."""
    rounds = {s.last_round for s in pooled_stages(scenario)[0]}
    for h in scenario.hospitals:
        rounds |= {s.last_round for s in hospital_stages(scenario, h.id)}
        rounds |= set(departures(scenario, h.id).values())
    return rounds


def forgetting_block(scenario: Scenario, table: DiceTable, hospital_id: str | None = None,
                     direction: str = "higher") -> dict:
    """``forgetting`` (headline, positive = got worse), ``forgetting_by_domain`` and ``forgetting_note`` of
    one metric's table: over the test domains that left every stream with the mean over hospitals (or,
    with ``hospital_id``, over the domains that left its stream with its own rows)."""
    T = scenario.federation.rounds
    ids = [h.id for h in scenario.hospitals] if hospital_id is None else [hospital_id]
    gone = departures(scenario, hospital_id)
    tested = {d: L for d, L in gone.items() if d in scenario.eval_domains}
    sign = 1.0 if direction == "higher" else -1.0
    then = {d: table.mean_over(L, ids, d) for d, L in tested.items()}
    final = {d: table.mean_over(T, ids, d) for d in tested}
    value, signed = departure_forgetting({d: sign * v for d, v in then.items()},
                                         {d: sign * v for d, v in final.items()})
    where = "every stream" if hospital_id is None else f"{hospital_id}'s stream"
    notes = [f"no test domain left {where} before round {T}: nothing to forget"] if not tested else []
    if set(gone) - set(tested):
        notes.append(f"left {where} but not evaluated: {', '.join(sorted(set(gone) - set(tested)))}")
    if tested and not math.isfinite(value):
        notes.append("a departed domain was not evaluated at its last training round or at the end")
    return {"forgetting": _num(value),
            "forgetting_by_domain": {d: {"last_trained_round": L, "then": _num(then[d]), "final": _num(final[d]),
                                         "forgetting": _num(signed[d])} for d, L in tested.items()},
            "forgetting_note": "; ".join(notes) if _num(value) is None else None}


def _stage_dicts(stages: list[Stage]) -> list[dict]:
    return [{"domain": s.domain, "first_round": s.first_round, "last_round": s.last_round} for s in stages]


def _metrics_block(R: np.ndarray, b: np.ndarray, stages: list[Stage]) -> dict:
    return {
        **{k: _num(v) for k, v in all_metrics(R, b).items()},
        "stages": _stage_dicts(stages),
        "R": [[_num(x) for x in row] for row in R],
        "b": [_num(x) for x in b],
    }


def _num(x: float) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else round(float(x), 6)


def arm_results(scenario: Scenario, rows: list[dict]) -> dict:
    """Per-hospital and pooled R, b and every labelled metric for one arm, and the headline forgetting."""
    table = DiceTable(rows)
    ids = [h.id for h in scenario.hospitals]
    per_hospital_R, (R, b, stages) = _matrices(scenario, table)
    per_hospital = {hid: {**_metrics_block(Rh, bh, st), **forgetting_block(scenario, table, hid)}
                    for hid, (Rh, bh, st) in per_hospital_R.items()}
    final_round = scenario.federation.rounds
    final = {d: _num(table.mean_over(final_round, ids, d)) for d in scenario.eval_domains}
    out = {**forgetting_block(scenario, table), "pooled": _metrics_block(R, b, stages),
           "per_hospital": per_hospital, "final_dice": final}
    pool = pool_events(scenario, rows)
    if pool is not None:
        oracle = DiceTable(rows, "dice_oracle")
        out["pool"] = pool
        out["final_dice_oracle"] = {d: _num(oracle.mean_over(final_round, ids, d)) for d in scenario.eval_domains}
    out["metrics"] = {name: metric_block(scenario, rows, name) for name in REGISTRY
                      if any(r["metric"] == name for r in rows)}
    return out


def _matrices(scenario: Scenario, table: DiceTable) -> tuple[dict, tuple]:
    """Per-hospital and pooled (R, b, stages) of one metric's table."""
    ids = [h.id for h in scenario.hospitals]
    per_hospital = {}
    for hid in ids:
        stages = hospital_stages(scenario, hid)
        per_hospital[hid] = (build_R(stages, lambda t, d, hid=hid: table.at(t, hid, d)),
                             initial_scores(stages, lambda d, hid=hid: table.at(0, hid, d)), stages)
    stages, groups = pooled_stages(scenario)

    def pooled_at(t: int, label: str) -> float:
        return float(np.mean([table.mean_over(t, ids, d) for d in groups[label]]))

    return per_hospital, (build_R(stages, pooled_at), initial_scores(stages, lambda label: pooled_at(0, label)), stages)


def oriented_metrics(R: np.ndarray, b: np.ndarray, direction: str) -> dict[str, float]:
    """``mean`` (GEM ACC formula on R), and BWT, FWT (the ODEx paper's), GEM FWT and Chaudhry forgetting
    with positive = better (BWT, FWT) and positive = got worse (forgetting) whatever the metric's
    direction: a lower-is-better metric is negated before the formulas, which turns max into min and
    flips the differences."""
    sign = 1.0 if direction == "higher" else -1.0
    A, base = sign * np.asarray(R, dtype=np.float64), sign * np.asarray(b, dtype=np.float64)
    return {"mean": gem_acc(R), "bwt": gem_bwt(A), "fwt": odex_fwt(A), "gem_fwt": gem_fwt(A, base),
            "chaudhry_forgetting": chaudhry_forgetting(A)}


def _oriented_block(R: np.ndarray, b: np.ndarray, stages: list[Stage], direction: str) -> dict:
    return {
        **{k: _num(v) for k, v in oriented_metrics(R, b, direction).items()},
        "stages": _stage_dicts(stages),
        "R": [[_num(x) for x in row] for row in R],
        "b": [_num(x) for x in b],
    }


def metric_block(scenario: Scenario, rows: list[dict], name: str) -> dict:
    """One registered metric's summary block: its direction and source, ``mean``/``bwt``/``fwt``/``gem_fwt``/
    ``chaudhry_forgetting`` of the pooled R, the headline ``forgetting`` (with ``forgetting_by_domain``), the
    final value per test domain (mean over hospitals), the pooled and per-hospital R and metrics; for a
    metric that counts missed structures also ``missed`` (``mean`` of the pooled R of ``<name>_missed``)
    and ``final_missed`` per domain."""
    metric = REGISTRY[name]
    table = DiceTable(rows, name)
    ids = [h.id for h in scenario.hospitals]
    final_round = scenario.federation.rounds
    per_hospital, (R, b, stages) = _matrices(scenario, table)
    block = {"direction": metric.direction, "source": metric.source,
             **_oriented_block(R, b, stages, metric.direction),
             **forgetting_block(scenario, table, direction=metric.direction),
             "final": {d: _num(table.mean_over(final_round, ids, d)) for d in scenario.eval_domains}}
    if metric.counts_missed:
        missed = DiceTable(rows, metric.missed_name)
        _, (Rm, _, _) = _matrices(scenario, missed)
        block["missed"] = _num(gem_acc(Rm))
        block["final_missed"] = {d: _num(missed.mean_over(final_round, ids, d)) for d in scenario.eval_domains}
    block["pooled"] = {k: block.pop(k) for k in ("stages", "R", "b")}
    block["per_hospital"] = {hid: {**_oriented_block(Rh, bh, st, metric.direction),
                                   **forgetting_block(scenario, table, hid, metric.direction)}
                             for hid, (Rh, bh, st) in per_hospital.items()}
    return block


def metric_matrices(res: dict) -> list[tuple[str, dict]]:
    """``(file name, block)`` of every non-headline metric's R in an :func:`arm_results` result:
    ``<hospital>.<metric>.csv`` and ``pooled.<metric>.csv`` (the headline's are ``<hospital>.csv``)."""
    out = []
    for name, m in res.get("metrics", {}).items():
        if name != HEADLINE:
            out += [(f"{hid}.{name}.csv", block) for hid, block in [("pooled", m["pooled"]), *m["per_hospital"].items()]]
    return out


def pool_events(scenario: Scenario, rows: list[dict]) -> dict | None:
    """Pool growth and shift-detection quality from ODEx rows (None when the arm keeps one model).

    detection delay: for every true boundary of a hospital (first round of each stage after the
    first), rounds from the boundary to the hospital's first change of member (a fork, or a move to
    another existing member) before its next boundary; a boundary without one is missed. For gradual
    and population drift a change from the start of the transition on counts (negative delay: the
    change came before the new domain became the majority). A fork that
    answers no boundary is a false alarm. (First-round groups of unlike hospitals are initial members,
    not forks.) routing purity: share of a domain's test images routed to the member that trained most
    on that domain, at the last evaluation, averaged over domains and hospitals.
    """
    sizes = {r["round"]: int(r["value"]) for r in rows if r["metric"] == "pool_size"}
    if not sizes:
        return None
    forks = sorted((r["round"], r["hospital"], int(r["value"]), r["domain"]) for r in rows if r["metric"] == "fork")
    member = {(r["round"], r["hospital"]): int(r["value"]) for r in rows if r["metric"] == "member"}
    delays, missed, answered = [], 0, set()
    for h in scenario.hospitals:
        rounds = sorted(t for (t, hh) in member if hh == h.id)
        switches = [t for a, t in zip(rounds, rounds[1:]) if member[(t, h.id)] != member[(a, h.id)]]
        stages = majority_stages(scenario, h.id)
        for i, st in enumerate(stages[1:], start=1):
            end = stages[i + 1].first_round if i + 1 < len(stages) else scenario.federation.rounds + 1
            begin = change_start(h.drift, stages[i - 1], st)
            hit = next((t for t in switches if begin <= t < end), None)
            if hit is None:
                missed += 1
            else:
                delays.append(hit - st.first_round)
                answered.add((hit, h.id))
    false_alarms = [f for f in forks if (f[0], f[1]) not in answered]
    last = max((r["round"] for r in rows if r["metric"] == "routing_purity"), default=None)
    purity = [r["value"] for r in rows if r["metric"] == "routing_purity" and r["round"] == last]
    return {
        "pool_size_final": sizes[max(sizes)],
        "pool_size_by_round": [sizes[t] for t in sorted(sizes)],
        "forks": [{"round": t, "hospital": h, "member": m, "true_domain": d} for t, h, m, d in forks],
        "boundaries": len(delays) + missed,
        "detected": len(delays),
        "missed": missed,
        "detection_delay_mean": _num(float(np.mean(delays))) if delays else None,
        "detection_delays": delays,
        "false_alarms": len(false_alarms),
        "routing_purity": _num(float(np.mean(purity))) if purity else None,
    }


def dice_by_round(rows: list[dict], hospitals: list[str], domains: list[str]) -> tuple[list[int], np.ndarray]:
    """Mean (over hospitals) Dice per evaluated round × domain: the trajectory behind R."""
    table = DiceTable(rows)
    rounds = sorted({t for (t, _, _) in table.values})
    M = np.array([[table.mean_over(t, hospitals, d) for d in domains] for t in rounds])
    return rounds, M


def rows_by_arm(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        out[r["arm"]].append(r)
    return out


LABELS = {**METRIC_LABELS, **FORGETTING_LABELS, **metric_labels()}
