"""From evaluation rows to per-hospital and pooled R matrices (synthetic rows, known numbers)."""

from __future__ import annotations

import pytest

from simlab.metrics.results import arm_results, hospital_stages, pool_events, pooled_stages
from simlab.scenario.schema import load_scenario_dict

RAW = {
    "name": "r", "domains": {"A": {}, "B": {}, "C": {}},
    "hospitals": [
        {"id": "h1", "drift": {"type": "abrupt", "domains": ["A", "B"], "at": [3]}},
        {"id": "h2", "drift": {"type": "abrupt", "domains": ["C", "A"], "at": [4]}},
    ],
    "federation": {"rounds": 5},
}


def rows(dice):
    return [{"arm": "x", "round": t, "hospital": h, "domain": d, "metric": "dice", "value": v}
            for (t, h, d), v in dice.items()]


def test_pooled_stages_group_domains_that_start_together():
    sc = load_scenario_dict(RAW, "<t>").base
    stages, groups = pooled_stages(sc)
    assert [(s.domain, s.first_round, s.last_round) for s in stages] == [("A+C", 1, 2), ("B", 3, 5)]
    assert groups == {"A+C": ["A", "C"], "B": ["B"]}


def test_per_hospital_and_pooled_matrices():
    sc = load_scenario_dict(RAW, "<t>").base
    # a model whose Dice on every domain depends only on the round, except B which it learns in r3
    table = {}
    for t, (a, b, c) in {0: (0.1, 0.1, 0.1), 2: (0.8, 0.2, 0.7), 3: (0.6, 0.9, 0.7), 5: (0.5, 0.9, 0.4)}.items():
        for h in ("h1", "h2"):
            table.update({(t, h, "A"): a, (t, h, "B"): b, (t, h, "C"): c})
    res = arm_results(sc, rows(table))
    h1 = res["per_hospital"]["h1"]
    assert h1["R"] == [[0.8, 0.2], [0.5, 0.9]]  # stage A ends r2, stage B ends r5
    assert h1["bwt"] == pytest.approx(0.5 - 0.8)
    assert h1["fwt"] == pytest.approx(0.2 - 0.1)
    h2 = res["per_hospital"]["h2"]  # C until r3, then A
    assert h2["R"] == [[0.7, 0.6], [0.4, 0.5]]
    assert h2["bwt"] == pytest.approx(0.4 - 0.7) and h2["forgetting"] == pytest.approx(0.3)
    pooled = res["pooled"]  # stages A+C (ends r2) and B (ends r5)
    assert pooled["R"] == [[pytest.approx(0.75), 0.2], [pytest.approx(0.45), 0.9]]
    assert pooled["bwt"] == pytest.approx(0.45 - 0.75)
    assert res["final_dice"] == {"A": 0.5, "B": 0.9, "C": 0.4}


def test_missing_evaluation_stays_nan_not_zero():
    sc = load_scenario_dict(RAW, "<t>").base
    res = arm_results(sc, rows({(5, "h1", "A"): 0.5}))
    assert res["per_hospital"]["h1"]["bwt"] is None and res["per_hospital"]["h1"]["R"][0][0] is None


def test_detection_counts_member_changes_from_the_start_of_a_transition():
    raw = {"name": "g", "domains": {"A": {}, "B": {}},
           "hospitals": [{"id": "h", "drift": {"type": "gradual", "domains": ["A", "B"], "start": 3, "end": 7}},
                         {"id": "k", "drift": {"type": "abrupt", "domains": ["A", "B"], "at": [4]}}],
           "federation": {"rounds": 8}}
    sc = load_scenario_dict(raw, "<t>").base
    member = {"h": [0, 0, 0, 1, 1, 1, 1, 1], "k": [0, 0, 0, 0, 0, 2, 2, 2]}  # h moves in r4, k forks in r6
    rows = [{"arm": "x", "round": t + 1, "hospital": h, "domain": None, "metric": "member", "value": m}
            for h, ms in member.items() for t, m in enumerate(ms)]
    rows += [{"arm": "x", "round": t, "hospital": "server", "domain": None, "metric": "pool_size", "value": 2}
             for t in range(1, 9)]
    rows += [{"arm": "x", "round": 6, "hospital": "k", "domain": "B", "metric": "fork", "value": 2},
             {"arm": "x", "round": 2, "hospital": "h", "domain": "A", "metric": "fork", "value": 1}]
    ev = pool_events(sc, rows)
    assert ev["boundaries"] == 2 and ev["missed"] == 0
    assert hospital_stages(sc, "h")[1].first_round == 6  # B becomes the majority in round 6 (share 3/4)
    assert ev["detection_delays"] == [4 - 6, 6 - 4]  # h moved during the transition, k two rounds late
    assert ev["false_alarms"] == 1  # the fork in round 2 answers no boundary
