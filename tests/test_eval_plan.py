"""The evaluation protocol without a Flower run: which hospital evaluates which domain, which
messages the server sends, and the rows it writes (replies stand in for the hospitals)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from simlab.federated import codec
from simlab.federated.eval_plan import assign_evaluators
from simlab.results import DiceTable
from simlab.runlog import SHARED, RunLog
from simlab.scenario.schema import load_scenario_dict

METRICS = ("dice", "hd95")  # two per domain are enough to count rows per metric


def test_each_domain_goes_to_an_owner_balanced():
    streams = {"h1": ["A", "B"], "h2": ["A"], "h3": ["C"], "h4": ["C"]}
    # B has one owner (h1) and is placed first; A then goes to h2, the less loaded of its owners
    assert assign_evaluators(["A", "B", "C"], streams) == {"h1": ["B"], "h2": ["A"], "h3": ["C"]}
    # a domain no stream reads goes to the least-loaded hospital (the first such)
    assert assign_evaluators(["A", "B", "C", "Z"], streams) == {"h1": ["B"], "h2": ["A"], "h3": ["C"], "h4": ["Z"]}
    # one owner of everything evaluates everything it owns
    assert assign_evaluators(["A", "B"], {"h1": ["A", "B"], "h2": ["C"]}) == {"h1": ["A", "B"]}
    # more domains than hospitals: balanced, every domain once, evaluator lists in domain order
    plan = assign_evaluators(list("ABCDE"), {"x": [], "y": []})
    assert plan == {"x": ["A", "C", "E"], "y": ["B", "D"]}
    assert assign_evaluators(["A"], {}) == {}


def test_assignment_at_64_hospitals_is_one_evaluator_per_domain_and_deterministic():
    doms = [f"d{i}" for i in range(5)]
    streams = {f"h{i:02d}": [doms[i % 5], doms[(i + 1) % 5]] for i in range(64)}
    plan = assign_evaluators(doms, streams)
    assert sorted(d for ds in plan.values() for d in ds) == sorted(doms)  # every domain exactly once
    assert len(plan) == 5 and all(set(ds) <= set(streams[h]) for h, ds in plan.items())
    assert plan == assign_evaluators(doms, dict(streams))


# ------------------------------------------------------------------------------ the server side
def scenario(tmp_path, n_hospitals: int, **sections):
    doms = {"A": {}, "B": {"scanner": {"contrast": "inverted"}}, "C": {}}
    cycle = [["A", "B"], ["A"], ["C"]]
    hospitals = []
    for i in range(n_hospitals):
        ds = cycle[i % 3]
        drift = ({"type": "abrupt", "domains": ds, "at": [2]} if len(ds) > 1 else {"type": "none", "domain": ds[0]})
        hospitals.append({"id": f"h{i}", "size": 4, "drift": drift})
    raw = {"name": "e", "seed": 1, "data": {"image_size": 32, "cache_dir": str(tmp_path / "cache")}, "domains": doms,
           "hospitals": hospitals, "model": {"channels": [4, 8]}, "federation": {"rounds": 3}, **sections}
    return load_scenario_dict(raw, "<test>").base


def reply(domains: list[str], value: float = 0.5):
    content = {"metrics": {f"{m}/{d}": value for m in METRICS for d in domains}}
    return SimpleNamespace(has_error=lambda: False, content=content)


def failure():
    return SimpleNamespace(has_error=lambda: True, error=SimpleNamespace(reason="boom"))


def federation(cls, sc, tmp_path, fail: set[str] = frozenset()):
    """A federation whose ``_send`` records the evaluate messages and answers for each hospital:
    the two metrics on each domain it was asked for (every domain when the message names none)."""
    fed = cls(None, sc, RunLog(tmp_path, "a"))
    fed.node_of = {h: i for i, h in enumerate(fed.ids)}
    fed.sent = []

    def send(kind, targets, requests):
        assert kind == codec.EVALUATE
        fed.sent.append({h: requests[h] for h in targets})
        return {h: failure() if h in fail else reply(requests[h].domains or sc.eval_domains) for h in targets}

    fed._send = send
    return fed


def rows_of(fed, tmp_path) -> list[dict]:
    fed.log.close()
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("n", [8, 64])
def test_a_shared_model_is_evaluated_once_per_domain(tmp_path, n):
    from simlab.federated.federation import Federation

    sc = scenario(tmp_path, n, evaluation={"adaptation": "adabn"})  # AdaBN depends on the test set only
    fed = federation(Federation, sc, tmp_path)
    assert not fed.deployed_per_hospital()
    state = {"w": np.zeros(10, np.float32)}
    down, evaluators = fed.evaluate(2, state)
    requests = fed.sent[0]
    assert list(requests) == evaluators == ["h0", "h1", "h2"]  # only evaluators are contacted
    assert {h: r.domains for h, r in requests.items()} == {"h0": ["B"], "h1": ["A"], "h2": ["C"]}
    assert all(r.state == {} for r in requests.values())  # the deployed model reads no private state
    assert down == 3 * 40
    rows = rows_of(fed, tmp_path)
    for m in METRICS:  # rows per metric = 1 deployed model × 3 domains, whatever the number of hospitals
        assert sorted((r["hospital"], r["domain"]) for r in rows if r["metric"] == m) == [
            (SHARED, "A"), (SHARED, "B"), (SHARED, "C")]
    table = DiceTable(rows)
    assert all(table.at(2, h, d) == 0.5 for h in fed.ids for d in "ABC")  # every hospital's own R reads them


def test_per_hospital_models_are_evaluated_by_every_hospital(tmp_path):
    from simlab.federated.federation import Federation

    sc = scenario(tmp_path, 4, federation={"rounds": 3, "norm": "local"})
    fed = federation(Federation, sc, tmp_path)
    assert fed.deployed_per_hospital()
    fed.evaluate(1, {"w": np.zeros(2, np.float32)})
    assert list(fed.sent[0]) == fed.ids and all(r.domains is None for r in fed.sent[0].values())
    rows = rows_of(fed, tmp_path)
    for m in METRICS:  # 4 hospitals × 3 domains
        assert sorted((r["hospital"], r["domain"]) for r in rows if r["metric"] == m) == sorted(
            (h, d) for h in fed.ids for d in "ABC")


def test_a_failed_evaluator_leaves_its_domains_missing(tmp_path):
    from simlab.federated.federation import Federation

    sc = scenario(tmp_path, 6)
    fed = federation(Federation, sc, tmp_path, fail={"h1"})  # h1 evaluates A
    fed.evaluate(3, {"w": np.zeros(2, np.float32)})
    rows = rows_of(fed, tmp_path)
    assert [(r["hospital"], r["domain"]) for r in rows if r["metric"] == "eval_failed"] == [("h1", None)]
    table = DiceTable(rows)
    assert all(math.isnan(table.at(3, h, "A")) for h in fed.ids)  # not filled in from anywhere else
    assert all(table.at(3, h, "B") == 0.5 for h in fed.ids)


def test_the_routed_pool_is_evaluated_once_per_domain(tmp_path):
    from simlab.federated.odex_server import OdexFederation
    from simlab.models.unet import build_model, state_to_numpy

    sc = scenario(tmp_path, 9, continual={"method": "odex"})
    fed = federation(OdexFederation, sc, tmp_path)
    model = build_model(sc.model, sc.num_classes)
    fed.setup_model(model, state_to_numpy(model))
    down, evaluators = fed.evaluate(1, None)
    requests = fed.sent[0]
    assert evaluators == ["h0", "h1", "h2"] and all(r.members is not None for r in requests.values())
    assert [r.domains for r in requests.values()] == [["B"], ["A"], ["C"]]
    assert down == sum(codec.broadcast_nbytes(r) for r in requests.values())
    rows = rows_of(fed, tmp_path)
    assert {r["hospital"] for r in rows if r["metric"] in METRICS} == {SHARED}
    assert len([r for r in rows if r["metric"] == "dice"]) == 3


# ------------------------------------------------------------------------------ reading shared rows
def test_shared_rows_are_every_hospitals_own():
    """Rows under SHARED give every hospital's R and the pooled R what per-hospital rows of the same
    model give; a hospital's own row wins where it has one."""
    from simlab.results import arm_results

    raw = {"name": "r", "domains": {"A": {}, "B": {}, "C": {}}, "federation": {"rounds": 5},
           "hospitals": [{"id": "h1", "drift": {"type": "abrupt", "domains": ["A", "B"], "at": [3]}},
                         {"id": "h2", "drift": {"type": "abrupt", "domains": ["C", "A"], "at": [4]}}]}
    sc = load_scenario_dict(raw, "<t>").base
    curve = {0: (0.1, 0.1, 0.1), 2: (0.8, 0.2, 0.7), 3: (0.6, 0.9, 0.7), 5: (0.5, 0.9, 0.4)}

    def rows(values):
        return [{"arm": "x", "round": t, "hospital": h, "domain": d, "metric": "dice", "value": v}
                for (t, h, d), v in values.items()]

    per_hospital = {(t, h, d): v for t, vals in curve.items() for h in ("h1", "h2") for d, v in zip("ABC", vals)}
    shared = {(t, SHARED, d): v for t, vals in curve.items() for d, v in zip("ABC", vals)}
    a, b = arm_results(sc, rows(per_hospital)), arm_results(sc, rows(shared))
    assert a["per_hospital"] == b["per_hospital"] and a["pooled"] == b["pooled"] and a["final_dice"] == b["final_dice"]
    assert b["per_hospital"]["h1"]["R"] == [[0.8, 0.2], [0.5, 0.9]]
    table = DiceTable(rows({**shared, (5, "h1", "A"): 0.25}))
    assert table.at(5, "h1", "A") == 0.25 and table.at(5, "h2", "A") == 0.5 and math.isnan(table.at(4, "h1", "A"))
