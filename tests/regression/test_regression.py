"""Metric regression suite: fixed-seed scenarios checked against committed baselines.

Markers: ``regression`` and ``flower`` (each scenario runs through Flower's simulation engine).
Select with ``pytest -m regression``; skip with ``-m "not regression"``.

``scenarios/forgetting.yaml`` (CPU, 32 px, 8 rounds, 3 hospitals, U-Net channels [8, 16, 32]) runs
once per session with four arms on identical streams: {sequential, replay} × {fedavg, ida}. st-anne
replaces its native-contrast scanner by an inverted-contrast one in round 4 and nobody else ever
trains on native contrast, so sequential fine-tuning has something to forget.

Two kinds of checks:

* against ``baselines/forgetting.yaml``: every arm's ACC, BWT, FWT, GEM FWT, forgetting, Chaudhry
  forgetting, HD95 and its missed share, bytes and wall time, direction aware, with the tolerances
  recorded in the file. The file is written only by ``make_baselines.py`` (through ``simlab compare
  --write-baseline``); regenerate it when a change of results is intended and review its diff.
* relational checks that hold whatever the baseline says: replay (which revisits old
  windows) keeps st-anne's old domain better than sequential fine-tuning (BWT, per hospital and
  pooled, the headline forgetting, and the final Dice on the old domain), its ACC is not below
  sequential's by more than a small margin, sequential does forget here (else the first check would
  be vacuous), the FedAvg arms weigh hospitals by labelled examples and the IDA arms do not, and no
  update was lost.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

from simlab.cli import main
from simlab.report import write_report
from simlab.report.commands import run_compare

pytestmark = [pytest.mark.flower, pytest.mark.regression]

HERE = Path(__file__).resolve().parent
RULES = ["fedavg", "ida"]
SWITCHER = "st-anne"  # native_a until round 3, inverted_b from round 4
OLD_DOMAIN = "native_a"
ACC_MARGIN = 0.02
FORGETTING_FLOOR = -0.05


@pytest.fixture(scope="module")
def forgetting_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("regression") / "forgetting"
    assert main(["run", str(HERE / "scenarios" / "forgetting.yaml"), "--out", str(out), "--quiet"]) == 0
    return out, json.loads((out / "summary.json").read_text())


def test_forgetting_matches_committed_baseline(forgetting_run, capsys):
    run_dir, _ = forgetting_run
    rc = run_compare([str(run_dir)], baseline=str(HERE / "baselines" / "forgetting.yaml"))
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "no regression against" in out


def test_no_update_lost(forgetting_run):
    run_dir, summary = forgetting_run
    for arm, a in summary["arms"].items():
        assert a["failed_updates"] == 0 and a["skipped_rounds"] == 0, arm
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in rows if r["metric"] in ("train_failed", "eval_failed", "update_rejected")]


@pytest.mark.parametrize("rule", RULES)
def test_replay_keeps_the_old_domain_sequential_forgets(forgetting_run, rule):
    _, summary = forgetting_run
    seq, replay = summary["arms"][f"sequential-{rule}"], summary["arms"][f"replay-{rule}"]
    assert replay["breaks_no_rehearsal"] and not seq["breaks_no_rehearsal"]
    s, j = seq["per_hospital"][SWITCHER], replay["per_hospital"][SWITCHER]
    assert [st["domain"] for st in s["stages"]] == [OLD_DOMAIN, "inverted_b"]
    assert s["bwt"] < FORGETTING_FLOOR, "sequential no longer forgets here: the scenario lost its point"
    assert j["bwt"] >= s["bwt"]
    assert replay["bwt"] >= seq["bwt"]  # pooled over hospitals
    # the headline: native_a leaves every stream after round 3, and sequential loses Dice on it
    assert list(seq["forgetting_by_domain"]) == [OLD_DOMAIN]
    assert seq["forgetting_by_domain"][OLD_DOMAIN]["last_trained_round"] == 3
    assert seq["forgetting"] > -FORGETTING_FLOOR and replay["forgetting"] <= seq["forgetting"]
    assert replay["final_dice"][OLD_DOMAIN] > seq["final_dice"][OLD_DOMAIN]


@pytest.mark.parametrize("rule", RULES)
def test_replay_acc_not_below_sequential(forgetting_run, rule):
    _, summary = forgetting_run
    seq, replay = summary["arms"][f"sequential-{rule}"], summary["arms"][f"replay-{rule}"]
    assert replay["acc"] >= seq["acc"] - ACC_MARGIN


def test_aggregation_rules_in_effect(forgetting_run):
    run_dir, summary = forgetting_run
    weights: dict[str, dict[int, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["metric"] == "agg_weight":
            weights[r["arm"]][r["round"]][r["hospital"]] = r["value"]
    labelled = {"st-anne": 12, "bay": 12, "hill": 3}  # size × label fraction
    fedavg = {h: n / sum(labelled.values()) for h, n in labelled.items()}
    for method in ("sequential", "replay"):
        assert summary["arms"][f"{method}-ida"]["aggregation"] == "ida"
        for t in range(1, 9):
            assert weights[f"{method}-fedavg"][t] == pytest.approx(fedavg)
            ida = weights[f"{method}-ida"][t]
            assert sum(ida.values()) == pytest.approx(1.0)
            assert max(abs(ida[h] - fedavg[h]) for h in labelled) > 0.05


def test_report_on_the_regression_run(forgetting_run):
    run_dir, summary = forgetting_run
    html = write_report(run_dir).read_text()
    for arm in summary["arms"]:
        assert arm in html
    pngs = sorted(p.name for p in (run_dir / "report").glob("*.png"))
    assert pngs == ["R_bay.png", "R_hill.png", "R_pooled.png", "R_st-anne.png", "cost_per_round.png",
                    "dice_over_rounds.png"]
    assert html.count('<img src="data:image/png;base64,') == len(pngs)
