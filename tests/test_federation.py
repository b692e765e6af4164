"""End to end through Flower's simulation engine: a tiny scenario, its run directory, determinism; and
the command line refusing a taken run directory or an invalid scenario before any engine starts."""

from __future__ import annotations

import json

import pytest

from simlab.cli import main

TINY = """\
name: tiny
seed: 1
data: {{image_size: 32, cache_dir: {cache}}}
domains:
  A: {{}}
  B: {{scanner: {{contrast: inverted, noise: 0.03}}}}
hospitals:
  - id: h1
    size: 8
    drift: {{type: abrupt, domains: [A, B], at: [3]}}
  - id: h2
    size: 8
    label_fraction: 0.5
    drift: {{type: none, domain: A}}
model: {{channels: [8, 16, 32]}}
federation: {{rounds: 4, local_steps: 2, batch_size: 4, lr: 0.005}}
evaluation: {{every: 2, test_size: 6}}
"""


@pytest.fixture()
def scenario(tmp_path):
    p = tmp_path / "tiny.yaml"
    p.write_text(TINY.format(cache=tmp_path / "cache"))
    return p


def read_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def eval_rows_per_round(rows, arm, metric="dice"):
    """round → hospital → number of ``metric`` rows: evaluation rows per round = deployed models × domains."""
    out: dict[int, dict[str, int]] = {}
    for r in rows:
        if r["arm"] == arm and r["metric"] == metric:
            out.setdefault(r["round"], {}).setdefault(r["hospital"], 0)
            out[r["round"]][r["hospital"]] += 1
    return out


@pytest.mark.flower
def test_two_arms_through_flower(scenario, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["run", str(scenario), "--out", str(out), "--quiet",
               "--set", "arms=[{name: sequential, set: {continual.method: sequential}}, "
                        "{name: replay, set: {continual.method: replay}}]"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "run directory" in printed and "replay" in printed
    for name in ("scenario.yaml", "metrics.jsonl", "rounds.jsonl", "summary.json", "simlab.log",
                 "R/sequential/h1.csv", "R/replay/pooled.csv", "dice_by_round/replay.csv"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    for arm in ("sequential", "replay"):
        a = summary["arms"][arm]
        assert {"acc", "bwt", "fwt", "forgetting", "wall_time_s", "per_hospital"} <= set(a)
        assert 0.0 <= a["acc"] <= 1.0 and a["wall_time_s"] > 0
        h1 = a["per_hospital"]["h1"]
        assert [s["domain"] for s in h1["stages"]] == ["A", "B"] and len(h1["R"]) == 2
        assert h1["bwt"] == pytest.approx(h1["R"][1][0] - h1["R"][0][0], abs=1e-5)
        assert a["per_hospital"]["h2"]["bwt"] is None  # one stage: no backward transfer
    assert summary["arms"]["replay"]["breaks_no_rehearsal"] is True
    rows = read_rows(out)
    evals = {(r["arm"], r["round"]) for r in rows if r["metric"] == "dice"}
    # round 0, every 2 rounds, the last round of h1's first stage (2) and the end (4)
    assert {t for a, t in evals if a == "sequential"} == {0, 2, 4}
    # one shared model: each domain evaluated once per evaluated round (rows under "all"), B by its only
    # owner h1 and A by h2, so that both evaluators have one domain
    for arm in ("sequential", "replay"):
        assert eval_rows_per_round(rows, arm) == {t: {"all": 2} for t in (0, 2, 4)}
    trains = [r for r in rows if r["metric"] == "train_loss" and r["arm"] == "sequential"]
    assert len(trains) == 8 and {r["domain"] for r in trains if r["hospital"] == "h1" and r["round"] >= 3} == {"B"}
    weights = [r["value"] for r in rows if r["metric"] == "agg_weight" and r["arm"] == "sequential" and r["round"] == 1]
    assert weights == pytest.approx([2 / 3, 1 / 3])  # FedAvg ∝ labelled examples: 8 vs 4
    costs = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert all(c["bytes_up"] > 0 for c in costs if c["round"] > 0)
    for c in costs:  # training and evaluation time per round; the evaluation's bytes are part of bytes_down
        assert ("eval_s" in c) == c["evaluated"] and ("train_s" in c) == (c["round"] > 0)
        if c["evaluated"]:
            assert c["evaluators"] == ["h1", "h2"] and 0 < c["eval_bytes_down"] <= c["bytes_down"]


@pytest.mark.flower
def test_same_seed_identical_metrics(scenario, tmp_path):
    runs = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        assert main(["run", str(scenario), "--out", str(out), "--quiet", "--set", "federation.rounds=3"]) == 0
        runs.append((out / "metrics.jsonl").read_text())
    assert runs[0] == runs[1]
    assert len(runs[0].splitlines()) > 20


def test_existing_run_dir_is_not_overwritten(scenario, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["run", str(scenario), "--out", str(out), "--quiet"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_invalid_scenario_exit_code_and_message(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndomains: {A: {}}\nhospitals: [{id: h, drift: {type: none, domain: A}}]\n"
                   "federation: {rounds: two}\n")
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "federation.rounds: expected an integer, found str 'two'" in err


ODEX = TINY.replace("federation: {{rounds: 4, local_steps: 2, batch_size: 4, lr: 0.005}}",
                    "federation: {{rounds: 5, local_steps: 3, batch_size: 4, lr: 0.005}}")


@pytest.mark.flower
def test_odex_ablations_keep_score_selection_and_change_when_to_fork(tmp_path):
    """The paper's Table 2 through Flower: ODEx −∞ξ (oracle forks), DiceEx and the Gram detector choose
    members by their scores (shift_ratio rows every round after the first); DiceEx's train replies
    carry the chosen member's Dice before training."""
    p = tmp_path / "odex.yaml"
    p.write_text(ODEX.format(cache=tmp_path / "cache"))
    out = tmp_path / "run"
    arms = ("arms=[{name: oracle, set: {continual.method: odex, continual.odex.expansion: oracle}}, "
            "{name: diceex, set: {continual.method: odex, continual.odex.expansion: dice}}, "
            "{name: gram, set: {continual.method: odex, continual.odex.features.reduction: gram, "
            "continual.odex.shift.estimator: identity}}]")
    assert main(["run", str(p), "--out", str(out), "--quiet", "--no-report", "--set", arms]) == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = read_rows(out)
    for arm in ("oracle", "diceex", "gram"):
        assert summary["arms"][arm]["failed_updates"] == 0 and summary["arms"][arm]["skipped_rounds"] == 0
        ratios = {r["round"] for r in rows if r["arm"] == arm and r["metric"] == "shift_ratio"}
        assert ratios == {2, 3, 4, 5}  # round 1 has no history to score against
    forks = {arm: [(f["round"], f["hospital"]) for f in summary["arms"][arm]["pool"]["forks"]]
             for arm in ("oracle", "diceex", "gram")}
    assert forks["oracle"] == [(3, "h1")]  # h1's true boundary, and nothing else
    assert forks["gram"] == [(3, "h1")]  # an inverted contrast changes the Gram matrix too
    dice = [r for r in rows if r["arm"] == "diceex" and r["metric"] == "window_dice"]
    assert {r["round"] for r in dice} == {1, 2, 3, 4, 5} and all(0.0 <= r["value"] <= 1.0 for r in dice)
    assert not any(r["arm"] != "diceex" and r["metric"] == "window_dice" for r in rows)


@pytest.mark.flower
def test_odex_pool_forks_at_the_scanner_change_and_routes(tmp_path):
    p = tmp_path / "odex.yaml"
    p.write_text(ODEX.format(cache=tmp_path / "cache"))
    out = tmp_path / "run"
    rc = main(["run", str(p), "--out", str(out), "--quiet", "--set",
               "arms=[{name: odex, set: {continual.method: odex}}, {name: ewc, set: {continual.method: ewc}}]"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    pool = summary["arms"]["odex"]["pool"]
    # h1 switches to an inverted-contrast scanner in round 3: one fork, by h1, in that round
    assert [(f["round"], f["hospital"], f["true_domain"]) for f in pool["forks"]] == [(3, "h1", "B")]
    sizes = pool["pool_size_by_round"]
    assert len(sizes) == 5 and sizes[0] == sizes[1] and sizes[2] == sizes[1] + 1 == sizes[3] == sizes[4]
    assert pool["detection_delays"] == [0] and pool["false_alarms"] == 0
    assert pool["routing_purity"] >= 0.8  # a handful of 32-pixel test images per domain
    rows = read_rows(out)
    assert any(r["metric"] == "dice_oracle" for r in rows)
    # the routed pool is the same system at every hospital: each domain evaluated once per round
    assert eval_rows_per_round(rows, "odex") == {t: {"all": 2} for t in (0, 2, 4, 5)}
    assert eval_rows_per_round(rows, "odex", "hd95") == eval_rows_per_round(rows, "odex")
    assert "pool" not in summary["arms"]["ewc"] and 0.0 <= summary["arms"]["ewc"]["acc"] <= 1.0
    costs = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    odex = [c for c in costs if c["arm"] == "odex" and c["round"] > 1]
    seq_model_bytes = next(c["bytes_down"] for c in costs if c["arm"] == "ewc" and c["round"] == 1)
    # the first round trains the initial model at once: one model per hospital, no query before it
    assert costs[1]["arm"] == "odex" and costs[1]["bytes_down"] == seq_model_bytes
    # the query ships histories, not models: far less than one model per hospital
    assert all(c["bytes_down"] < 2 * seq_model_bytes + 2 * 0.5 * seq_model_bytes for c in odex if not c["evaluated"])


@pytest.mark.flower
def test_plugins_run_end_to_end_through_flower(scenario, tmp_path):
    """LwF, the static upper bound, the coordinate-wise median and the trimmed mean, each as an arm of
    one run."""
    out = tmp_path / "run"
    arms = ("arms=[{name: lwf, set: {continual.method: lwf, continual.lwf.temperature: 3.0}}, "
            "{name: ub, set: {continual.method: upper_bound}}, "
            "{name: median, set: {federation.aggregation.rule: median}}, "
            "{name: trimmed, set: {federation.aggregation.rule: trimmed_mean, "
            "federation.aggregation.trimmed_mean.beta: 0.1}}]")
    assert main(["run", str(scenario), "--out", str(out), "--quiet", "--no-report", "--set", "federation.rounds=3",
                 "--set", arms]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["arms"]["lwf"]["method"] == "lwf"
    assert summary["arms"]["ub"]["uses_future_data"] and summary["arms"]["ub"]["breaks_no_rehearsal"]
    assert [summary["arms"][a]["aggregation"] for a in ("median", "trimmed")] == ["median", "trimmed_mean"]
    rows = read_rows(out)
    for arm in ("lwf", "ub", "median", "trimmed"):
        assert summary["arms"][arm]["failed_updates"] == 0 and summary["arms"][arm]["skipped_rounds"] == 0
        assert {r["round"] for r in rows if r["arm"] == arm and r["metric"] == "train_loss"} == {1, 2, 3}
        assert {r["round"] for r in rows if r["arm"] == arm and r["metric"] == "dice"} == {0, 2, 3}
    weights = {r["arm"] for r in rows if r["metric"] == "agg_weight"}
    assert weights == {"lwf", "ub"}  # median and trimmed mean are not weightings: no weights to log


@pytest.mark.flower
def test_local_norm_and_adabn_through_flower(scenario, tmp_path):
    """FedBN: each hospital's deployed model has its own normalisation layers, so two hospitals score
    the same test set differently (one shared model would score it identically); AdaBN on top."""
    out = tmp_path / "run"
    assert main(["run", str(scenario), "--out", str(out), "--quiet", "--no-report", "--set", "federation.rounds=3",
                 "--set", "federation.norm=local", "--set", "evaluation.adaptation=adabn"]) == 0
    rows = read_rows(out)
    assert not [r for r in rows if r["metric"] in ("train_failed", "eval_failed", "update_rejected")]
    final = {(r["hospital"], r["domain"]): r["value"] for r in rows if r["metric"] == "dice" and r["round"] == 3}
    assert final[("h1", "A")] != final[("h2", "A")]
    arm = rows[0]["arm"]  # one deployed model per hospital: hospitals × domains rows per evaluated round
    assert eval_rows_per_round(rows, arm) == {t: {"h1": 2, "h2": 2} for t in (0, 2, 3)}
    costs = {c["round"]: c for c in map(json.loads, (out / "rounds.jsonl").read_text().splitlines())}
    assert not costs[1]["evaluated"] and costs[1]["bytes_up"] < costs[1]["bytes_down"]  # normalisation stays home
