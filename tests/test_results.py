"""From evaluation rows to per-hospital and pooled R matrices (synthetic rows, known numbers)."""

from __future__ import annotations

import pytest

from simlab.results import LABELS, arm_results, hospital_stages, metric_matrices, pool_events, pooled_stages
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


# ------------------------------------------------------------------- every registered metric
def metric_rows_of(name, values):
    return [{"arm": "x", "round": t, "hospital": h, "domain": d, "metric": name, "value": v}
            for (t, h, d), v in values.items()]


def hd95_run():
    """Dice and HD95 on RAW: A is learnt first, then h1 moves to B and A's HD95 grows (forgetting)."""
    dice, hd, missed = {}, {}, {}
    curve = {0: (20.0, 20.0, 20.0), 2: (5.0, 15.0, 6.0), 3: (8.0, 4.0, 6.0), 5: (10.0, 3.0, 9.0)}
    for t, (a, b, c) in curve.items():
        for h in ("h1", "h2"):
            hd.update({(t, h, "A"): a, (t, h, "B"): b, (t, h, "C"): c})
            dice.update({(t, h, "A"): 1 / a, (t, h, "B"): 1 / b, (t, h, "C"): 1 / c})
            missed.update({(t, h, d): 0.5 if t == 0 else 0.1 for d in "ABC"})
    missed[(5, "h2", "B")] = 0.3
    return rows(dice) + metric_rows_of("hd95", hd) + metric_rows_of("hd95_missed", missed)


def test_lower_is_better_metric_block_signs():
    sc = load_scenario_dict(RAW, "<t>").base
    res = arm_results(sc, hd95_run())
    block = res["metrics"]["hd95"]
    assert block["direction"] == "lower" and "MONAI" in block["source"]
    h1 = block["per_hospital"]["h1"]  # stages A (ends r2), B (ends r5); b = round 0
    assert h1["R"] == [[5.0, 15.0], [10.0, 3.0]] and h1["b"] == [20.0, 20.0]
    assert h1["mean"] == pytest.approx((10.0 + 3.0) / 2)
    assert h1["bwt"] == pytest.approx(5.0 - 10.0)  # A got worse after B: negative BWT
    assert h1["forgetting"] == pytest.approx(10.0 - 5.0)  # positive forgetting = got worse
    assert h1["fwt"] == pytest.approx(20.0 - 15.0)  # zero-shot B better than untrained: positive FWT
    pooled = block["pooled"]  # A+C (ends r2), B (ends r5)
    assert pooled["R"] == [[5.5, 15.0], [9.5, 3.0]]
    assert block["mean"] == pytest.approx((9.5 + 3.0) / 2)
    assert block["bwt"] == pytest.approx(5.5 - 9.5) and block["forgetting"] == pytest.approx(9.5 - 5.5)
    assert block["final"] == {"A": 10.0, "B": 3.0, "C": 9.0}
    assert block["final_missed"] == {"A": 0.1, "B": pytest.approx(0.2), "C": 0.1}
    assert block["missed"] == pytest.approx((0.1 + 0.2) / 2)  # final row of the pooled missed R: A+C, B
    # the higher-is-better headline: its block repeats the arm-level numbers, GEM/Chaudhry signs
    d = res["metrics"]["dice"]
    assert d["direction"] == "higher" and "missed" not in d
    assert [d[k] for k in ("mean", "bwt", "fwt", "forgetting")] == [res["pooled"][k] for k in ("acc", "bwt", "fwt", "forgetting")]
    assert d["pooled"]["R"] == res["pooled"]["R"] and d["per_hospital"]["h1"]["R"] == res["per_hospital"]["h1"]["R"]
    assert res["pooled"]["forgetting"] > 0 and d["per_hospital"]["h1"]["bwt"] < 0  # Dice of A fell too


def test_metric_absent_from_the_rows_has_no_block_and_matrices_are_named():
    sc = load_scenario_dict(RAW, "<t>").base
    only_dice = arm_results(sc, rows({(5, "h1", "A"): 0.5}))
    assert list(only_dice["metrics"]) == ["dice"] and metric_matrices(only_dice) == []
    names = [n for n, _ in metric_matrices(arm_results(sc, hd95_run()))]
    assert names == ["pooled.hd95.csv", "h1.hd95.csv", "h2.hd95.csv"]
    assert {"hd95", "hd95_missed", "metrics.<metric>.forgetting", "acc"} <= set(LABELS)
