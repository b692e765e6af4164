"""From evaluation rows to per-hospital and pooled R matrices (synthetic rows, known numbers)."""

from __future__ import annotations

import pytest

from simlab.results import (LABELS, arm_results, departures, hospital_stages, majority_stages, metric_matrices,
                            metric_rounds, pool_events, pooled_stages)
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
    assert h1["fwt"] == pytest.approx(0.9 - 0.2)  # the ODEx paper's: R[2][2] - R[1][2]
    assert h1["gem_fwt"] == pytest.approx(0.2 - 0.1)  # GEM's: R[1][2] - b[2]
    h2 = res["per_hospital"]["h2"]  # C until r3, then A
    assert h2["R"] == [[0.7, 0.6], [0.4, 0.5]]
    assert h2["bwt"] == pytest.approx(0.4 - 0.7) and h2["chaudhry_forgetting"] == pytest.approx(0.3)
    pooled = res["pooled"]  # stages A+C (ends r2) and B (ends r5)
    assert pooled["R"] == [[pytest.approx(0.75), 0.2], [pytest.approx(0.45), 0.9]]
    assert pooled["bwt"] == pytest.approx(0.45 - 0.75) and "forgetting" not in pooled
    assert res["final_dice"] == {"A": 0.5, "B": 0.9, "C": 0.4}
    # headline: only C left every stream (h2 trains on it until r3; A comes back in h2)
    assert departures(sc) == {"C": 3} and res["forgetting"] == pytest.approx(0.7 - 0.4)
    assert res["forgetting_by_domain"] == {"C": {"last_trained_round": 3, "then": 0.7, "final": 0.4,
                                                 "forgetting": pytest.approx(0.3)}}
    # per hospital: the domain that left its own stream, its own model
    assert h1["forgetting"] == pytest.approx(0.8 - 0.5) and list(h1["forgetting_by_domain"]) == ["A"]
    assert h2["forgetting"] == pytest.approx(0.7 - 0.4) and list(h2["forgetting_by_domain"]) == ["C"]


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
    assert majority_stages(sc, "h")[1].first_round == 6  # B becomes the majority in round 6 (share 3/4)
    assert hospital_stages(sc, "h")[1].first_round == 4  # R's stage B starts with the transition
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
    assert h1["chaudhry_forgetting"] == pytest.approx(10.0 - 5.0)  # positive forgetting = got worse
    assert h1["forgetting"] == pytest.approx(10.0 - 5.0)  # A left h1 after r2: 5 then, 10 at the end
    assert h1["gem_fwt"] == pytest.approx(20.0 - 15.0)  # zero-shot B better than untrained: positive
    assert h1["fwt"] == pytest.approx(15.0 - 3.0)  # training on B made B better: positive
    pooled = block["pooled"]  # A+C (ends r2), B (ends r5)
    assert pooled["R"] == [[5.5, 15.0], [9.5, 3.0]]
    assert block["mean"] == pytest.approx((9.5 + 3.0) / 2)
    assert block["bwt"] == pytest.approx(5.5 - 9.5) and block["chaudhry_forgetting"] == pytest.approx(9.5 - 5.5)
    # headline: C left every stream after r3 (HD95 6.0 then, 9.0 at the end: worse by 3)
    assert block["forgetting"] == pytest.approx(3.0) and block["forgetting_by_domain"]["C"] == {"last_trained_round": 3, "then": 6.0, "final": 9.0, "forgetting": 3.0}
    assert block["final"] == {"A": 10.0, "B": 3.0, "C": 9.0}
    assert block["final_missed"] == {"A": 0.1, "B": pytest.approx(0.2), "C": 0.1}
    assert block["missed"] == pytest.approx((0.1 + 0.2) / 2)  # final row of the pooled missed R: A+C, B
    # the higher-is-better headline: its block repeats the arm-level numbers, GEM/Chaudhry signs
    d = res["metrics"]["dice"]
    assert d["direction"] == "higher" and "missed" not in d
    keys = ("acc", "bwt", "fwt", "gem_fwt", "chaudhry_forgetting")
    assert [d[k] for k in ("mean", *keys[1:])] == [res["pooled"][k] for k in keys]
    assert d["forgetting"] == res["forgetting"] and d["forgetting_by_domain"] == res["forgetting_by_domain"]
    assert d["pooled"]["R"] == res["pooled"]["R"] and d["per_hospital"]["h1"]["R"] == res["per_hospital"]["h1"]["R"]
    assert d["per_hospital"]["h1"]["forgetting"] == res["per_hospital"]["h1"]["forgetting"]
    assert res["pooled"]["chaudhry_forgetting"] > 0 and d["per_hospital"]["h1"]["bwt"] < 0  # Dice of A fell too
    assert res["forgetting"] == pytest.approx(1 / 6 - 1 / 9, abs=1e-6)  # Dice of C fell after it left


def test_metric_absent_from_the_rows_has_no_block_and_matrices_are_named():
    sc = load_scenario_dict(RAW, "<t>").base
    only_dice = arm_results(sc, rows({(5, "h1", "A"): 0.5}))
    assert list(only_dice["metrics"]) == ["dice"] and metric_matrices(only_dice) == []
    names = [n for n, _ in metric_matrices(arm_results(sc, hd95_run()))]
    assert names == ["pooled.hd95.csv", "h1.hd95.csv", "h2.hd95.csv"]
    assert {"hd95", "hd95_missed", "metrics.<metric>.forgetting", "acc", "fwt", "gem_fwt", "chaudhry_forgetting",
            "forgetting", "forgetting_by_domain"} <= set(LABELS)


# ------------------------------------------------------------------- forgetting where it happens
DEPARTURE = {  # like the quickstart: legacy leaves every stream after r3, city and young stay in theirs
    "name": "d", "domains": {"legacy": {}, "new": {}, "city": {}, "young": {}, "old": {}},
    "hospitals": [
        {"id": "s", "drift": {"type": "abrupt", "domains": ["legacy", "new"], "at": [4]}},
        {"id": "c", "drift": {"type": "none", "domain": "city"}},
        {"id": "n", "drift": {"type": "none", "domain": "young"}},
    ],
    "federation": {"rounds": 6},
}


def same_for_all(curves: dict[int, dict[str, float]], hospitals=("s", "c", "n")) -> list[dict]:
    """Rows of one global model: every hospital sees the same Dice per round and domain."""
    return rows({(t, h, d): v for t, per in curves.items() for h in hospitals for d, v in per.items()})


def test_headline_shows_a_forgotten_domain_that_pooled_bwt_hides():
    sc = load_scenario_dict(DEPARTURE, "<t>").base
    curves = {0: {"legacy": 0.1, "new": 0.1, "city": 0.1, "young": 0.1, "old": 0.1},
              3: {"legacy": 0.67, "new": 0.2, "city": 0.3, "young": 0.3, "old": 0.1},
              6: {"legacy": 0.36, "new": 0.8, "city": 0.9, "young": 0.9, "old": 0.1}}
    res = arm_results(sc, same_for_all(curves))
    pooled = res["pooled"]  # stage 1 = legacy+city+young (r1-3), stage 2 = new (r4-6)
    assert [s["domain"] for s in pooled["stages"]] == ["legacy+city+young", "new"]
    assert pooled["bwt"] > 0.2  # city and young still being learnt count as "backward transfer"
    assert departures(sc) == {"legacy": 3}
    assert res["forgetting"] == pytest.approx(0.67 - 0.36)  # the headline says legacy was forgotten
    assert res["forgetting_by_domain"]["legacy"]["last_trained_round"] == 3 and res["forgetting_note"] is None
    assert res["per_hospital"]["s"]["forgetting"] == pytest.approx(0.31)
    assert res["per_hospital"]["c"]["forgetting"] is None  # nothing left c's stream
    assert "no test domain left c's stream" in res["per_hospital"]["c"]["forgetting_note"]


def test_a_gain_on_one_departed_domain_does_not_offset_a_loss_on_another():
    raw = {**DEPARTURE, "hospitals": [*DEPARTURE["hospitals"][:2],
                                      {"id": "n", "drift": {"type": "abrupt", "domains": ["young", "old"], "at": [4]}}]}
    sc = load_scenario_dict(raw, "<t>").base
    curves = {3: {"legacy": 0.67, "young": 0.3, "new": 0.2, "city": 0.3, "old": 0.2},
              6: {"legacy": 0.36, "young": 0.9, "new": 0.8, "city": 0.9, "old": 0.8}}
    res = arm_results(sc, same_for_all(curves))
    signed = {d: v["forgetting"] for d, v in res["forgetting_by_domain"].items()}
    assert signed == {"legacy": pytest.approx(0.31), "young": pytest.approx(-0.6)}  # signed: young was gained
    assert res["forgetting"] == pytest.approx((0.31 + 0.0) / 2)  # each clipped at 0, then averaged
    assert res["forgetting"] > 0


def test_no_departed_domain_gives_null_with_a_reason():
    raw = {**DEPARTURE, "hospitals": DEPARTURE["hospitals"][1:]}
    sc = load_scenario_dict(raw, "<t>").base
    res = arm_results(sc, same_for_all({6: {"city": 0.9, "young": 0.9}}, ("c", "n")))
    assert res["forgetting"] is None and res["forgetting_by_domain"] == {}
    assert res["forgetting_note"] == "no test domain left every stream before round 6: nothing to forget"


GRADUAL = {  # h moves from A to B between rounds 3 and 7 (A's share 3/4, 1/2, 1/4 in r4-6); k stays on C
    "name": "g", "domains": {"A": {}, "B": {}, "C": {}},
    "hospitals": [{"id": "h", "drift": {"type": "gradual", "domains": ["A", "B"], "start": 3, "end": 7}},
                  {"id": "k", "drift": {"type": "none", "domain": "C"}}],
    "federation": {"rounds": 8}, "evaluation": {"every": 5},
}


@pytest.mark.parametrize("mode", ["mix", "interpolate"])
def test_gradual_stage_starts_with_its_transition(mode):
    raw = {**GRADUAL, "hospitals": [{**GRADUAL["hospitals"][0], "drift": {**GRADUAL["hospitals"][0]["drift"],
                                                                           "mode": mode}}, GRADUAL["hospitals"][1]]}
    sc = load_scenario_dict(raw, "<t>").base
    majority = {"mix": 6, "interpolate": 5}[mode]  # a tie of the mixture goes to A, an interpolation half-way to B
    assert [(s.domain, s.first_round) for s in majority_stages(sc, "h")] == [("A", 1), ("B", majority)]
    assert [(s.domain, s.first_round, s.last_round) for s in hospital_stages(sc, "h")] == [("A", 1, 3), ("B", 4, 8)]
    stages, _ = pooled_stages(sc)  # B first contributes in r4
    assert [(s.domain, s.first_round, s.last_round) for s in stages] == [("A+C", 1, 3), ("B", 4, 8)]
    assert departures(sc) == {"A": 6}  # A still contributes (1/4) in r6
    assert metric_rounds(sc) == {3, 6, 8}
    from simlab.federated.federation import evaluation_rounds

    assert evaluation_rounds(sc) == [0, 3, 5, 6, 8]
    curve = {0: (0.1, 0.1, 0.1), 3: (0.8, 0.2, 0.7), 5: (0.7, 0.5, 0.7), 6: (0.6, 0.7, 0.7), 8: (0.4, 0.9, 0.8)}
    res = arm_results(sc, rows({(t, h, d): v for t, vals in curve.items() for h in ("h", "k")
                                for d, v in zip("ABC", vals)}))
    h = res["per_hospital"]["h"]
    assert h["R"] == [[0.8, 0.2], [0.4, 0.9]]  # stage A's row is zero-shot on B (r3, before any B)
    assert h["fwt"] == pytest.approx(0.9 - 0.2) and h["forgetting"] == pytest.approx(0.6 - 0.4)
    assert res["forgetting"] == pytest.approx(0.6 - 0.4)


def test_population_change_starts_where_the_weights_start_moving():
    raw = {"name": "p", "domains": {"A": {}, "B": {}},
           "hospitals": [{"id": "h", "drift": {"type": "population", "domains": ["A", "B"], "start": 3, "end": 7,
                                               "weights_start": [0.8, 0.2], "weights_end": [0.2, 0.8]}}],
           "federation": {"rounds": 8}}
    sc = load_scenario_dict(raw, "<t>").base
    assert [(s.domain, s.first_round) for s in majority_stages(sc, "h")] == [("A", 1), ("B", 6)]
    assert [(s.domain, s.first_round, s.last_round) for s in hospital_stages(sc, "h")] == [("A", 1, 3), ("B", 4, 8)]
    assert [s.domain for s in pooled_stages(sc)[0]] == ["A+B"] and departures(sc) == {}


def test_abrupt_stages_and_schedule_unchanged():
    sc = load_scenario_dict(RAW, "<t>").base
    assert hospital_stages(sc, "h1") == majority_stages(sc, "h1")
    from simlab.federated.federation import evaluation_rounds

    assert evaluation_rounds(sc) == [0, 2, 3, 5]


def test_a_site_that_does_not_participate_only_tests():
    """Its stream's domains are not stages the federation learns nor domains that left a training stream;
    its own block still follows its stream."""
    raw = {**RAW, "hospitals": [*RAW["hospitals"],
                                {"id": "new", "participates": False, "label_fraction": 0,
                                 "drift": {"type": "abrupt", "domains": ["C", "B"], "at": [2]}}]}
    sc = load_scenario_dict(raw, "<t>").base
    assert pooled_stages(sc) == pooled_stages(load_scenario_dict(RAW, "<t>").base)
    assert departures(sc) == {"C": 3}  # h2's, not the newcomer's C, which left its stream after round 1
    assert departures(sc, "new") == {"C": 1}
    assert [(s.domain, s.first_round) for s in hospital_stages(sc, "new")] == [("C", 1), ("B", 2)]
