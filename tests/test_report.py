"""`simlab report`: the HTML page and its figures, from run directories with one arm and with two.

The run directories are made by the same code path as a real run after its simulation: the
scenario is loaded and validated, metric rows of the run-directory format are written to
metrics.jsonl / rounds.jsonl (synthetic Dice values, so no training is needed), and
``simlab.rundir.write_results`` computes summary.json and the R matrices from them.
"""

from __future__ import annotations

import base64
import json
import math
import re

import pytest
import yaml

from simlab.report import ReportError, write_report
from simlab.report.commands import run_report
from simlab.report.plots import cost_figure, dice_figure, pool_figure, r_matrix_figure, routing_figure
from simlab.rundir import write_results
from simlab.scenario.schema import load_scenario_dict, resolved_dict

SCENARIO = {
    "name": "synthetic",
    "seed": 3,
    "data": {"image_size": 32},
    "domains": {"A": {}, "B": {"scanner": {"contrast": "inverted"}}, "C": {"scanner": {"noise": 0.05}}},
    "hospitals": [
        {"id": "h1", "size": 4, "drift": {"type": "abrupt", "domains": ["A", "B"], "at": [4]}},
        {"id": "h2", "size": 4, "drift": {"type": "gradual", "domains": ["C", "A"], "start": 2, "end": 5}},
    ],
    "federation": {"rounds": 6},
    "evaluation": {"every": 2},
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def dice_value(arm: str, hospital: str, domain: str, t: int) -> float:
    """Synthetic but plausible: learning curves; the sequential arm forgets A after h1 leaves it."""
    v = 0.2 + 0.6 * (1 - math.exp(-t / 2))
    if arm.startswith("sequential") and domain == "A" and t >= 4:
        v -= 0.1 * (t - 3)
    return round(v - (0.03 if hospital == "h2" else 0.0), 6)


def hd95_value(arm: str, hospital: str, domain: str, t: int) -> float:
    """Falls as the model learns; grows on A for the sequential arm once h1 has left A."""
    v = 30.0 * math.exp(-t / 2) + 2.0
    if arm.startswith("sequential") and domain == "A" and t >= 4:
        v += 4.0 * (t - 3)
    return round(v + (0.5 if hospital == "h2" else 0.0), 6)


def make_run_dir(path, arms: list[str], odex: bool = False, failures: bool = False, hd95: bool = False):
    method = {a: next((m for m in ("replay", "upper_bound") if a.startswith(m)), "sequential") for a in arms}
    raw = {**SCENARIO, "arms": [{"name": a, "set": {"continual.method": method[a]}} for a in arms]}
    loaded = load_scenario_dict(raw, "synthetic.yaml")
    path.mkdir()
    (path / "scenario.yaml").write_text(yaml.safe_dump(resolved_dict(loaded), sort_keys=False))
    rows, costs = [], []
    T = loaded.base.federation.rounds
    for arm in arms:
        for t in range(T + 1):
            for h in ("h1", "h2"):
                for d in ("A", "B", "C"):
                    rows.append({"arm": arm, "round": t, "hospital": h, "domain": d, "metric": "dice",
                                 "value": dice_value(arm, h, d, t)})
                    if hd95:
                        rows.append({"arm": arm, "round": t, "hospital": h, "domain": d, "metric": "hd95",
                                     "value": hd95_value(arm, h, d, t)})
                        rows.append({"arm": arm, "round": t, "hospital": h, "domain": d, "metric": "hd95_missed",
                                     "value": 0.25 if t == 0 else 0.05})
                if t > 0:
                    rows.append({"arm": arm, "round": t, "hospital": h, "domain": "A", "metric": "train_loss", "value": 1 / t})
            costs.append({"arm": arm, "round": t, "wall_time_s": 1.0 + 0.5 * (t % 2 == 0), "evaluated": t % 2 == 0,
                          **({"sent": ["h1", "h2"], "replied": ["h1", "h2"], "failed": [], "bytes_down": 1_000_000 * (1 + (t % 2 == 0)),
                              "bytes_up": 1_000_000} if t > 0 else {})})
            if odex:
                rows.append({"arm": arm, "round": t, "hospital": "server", "domain": None, "metric": "pool_size",
                             "value": 1 if t < 4 else 2})
                if t == 4:
                    rows.append({"arm": arm, "round": 4, "hospital": "h1", "domain": "B", "metric": "fork", "value": 1})
                for d in ("A", "B", "C"):
                    rows.append({"arm": arm, "round": t, "hospital": "server", "domain": d, "metric": "routing_purity",
                                 "value": 1.0 if t < 4 or d != "B" else 0.8})
    if failures:
        rows.append({"arm": arms[0], "round": 3, "hospital": "h2", "domain": "C", "metric": "train_failed", "value": 1})
        rows.append({"arm": arms[0], "round": 5, "hospital": "h1", "domain": "B", "metric": "update_rejected", "value": 1})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "rounds.jsonl").write_text("".join(json.dumps(c) + "\n" for c in costs))
    summary = write_results(path, loaded, {a: 12.5 for a in arms})
    return path, summary


def images(html: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', html)


def test_report_one_arm(tmp_path):
    run, summary = make_run_dir(tmp_path / "run", ["sequential"])
    out = write_report(run)
    assert out == run / "report" / "index.html"
    html = out.read_text()
    for anchor, heading in [("summary", "Summary"), ("scenario", "Scenario"), ("matrices", "Accuracy matrices R"),
                            ("dice", "Dice over rounds"), ("pool", "Model pool"), ("cost", "Cost: bytes and wall time"),
                            ("failures", "Failures and rejected updates"), ("definitions", "Metric definitions")]:
        assert f'<h2 id="{anchor}">{heading}</h2>' in html and f'href="#{anchor}"' in html
    pngs = sorted(p.name for p in (run / "report").glob("*.png"))
    # pooled R, one R per hospital, Dice over rounds, cost; no pool plot for a single model
    assert pngs == ["R_h1.png", "R_h2.png", "R_pooled.png", "cost_per_round.png", "dice_over_rounds.png"]
    srcs = images(html)
    assert len(srcs) == len(pngs)
    for name in pngs:  # every figure embedded, byte for byte the PNG written beside the page
        data = (run / "report" / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000
        assert "data:image/png;base64," + base64.b64encode(data).decode() in srcs
    assert all(s.startswith("data:image/png;base64,") for s in srcs)  # opens from disk alone
    assert "Single model: no arm keeps a model pool" in html
    assert "None: every sampled hospital replied" in html
    a = summary["arms"]["sequential"]
    assert f"<td class=\"num\">{a['acc']:.3f}</td>" in html
    assert f"{a['bwt']:+.3f}" in html and a["bwt"] < 0  # h1 forgets A after round 3
    assert "A, then B from round 4" in html and "C to A (mixed) over rounds 2–5" in html
    departed = html.split("<h3>Forgetting per domain that left every stream")[1].split("<h3>")[0]
    assert "<td class=\"txt\">C</td>" in departed and "<td class=\"num\">4</td>" in departed
    assert f"{a['forgetting_by_domain']['C']['forgetting']:+.3f}" in departed
    assert "<em>(replay" not in html.split('id="scenario"')[0] and "<em>(upper bound" not in html


def test_report_two_arms_with_pool_and_failures(tmp_path):
    run, summary = make_run_dir(tmp_path / "run", ["sequential", "replay"], odex=True, failures=True)
    assert run_report(str(run)) == 0
    html = (run / "report" / "index.html").read_text()
    pngs = {p.name for p in (run / "report").glob("*.png")}
    assert {"pool_size.png", "routing_purity.png", "R_pooled.png", "dice_over_rounds.png"} <= pngs
    assert len(images(html)) == len(pngs) == 7
    assert "Single model" not in html and "Forks per arm: {&#x27;sequential&#x27;: 1, &#x27;replay&#x27;: 1}" in html
    summary_table = html.split('<h2 id="summary">')[1].split("<h3>")[0]
    assert "replay <em>(replay (breaks no-rehearsal))</em>" in summary_table
    assert '<tr class="reference">' in summary_table
    assert summary_table.count("<td class=\"num\">2</td>") == 2  # final pool K of both arms
    failures = html.split('<h2 id="failures">')[1].split("<h2")[0]
    assert "train_failed" in failures and "update_rejected" in failures and "<td class=\"num\">3</td>" in failures
    for arm in ("sequential", "replay"):
        assert f"{summary['arms'][arm]['acc']:.3f}" in summary_table


def test_reference_arms_are_labelled_for_what_they_are(tmp_path):
    run, summary = make_run_dir(tmp_path / "run", ["sequential", "upper_bound"])
    assert summary["arms"]["upper_bound"]["uses_future_data"] and not summary["arms"]["sequential"]["uses_future_data"]
    summary_table = write_report(run).read_text().split('<h2 id="summary">')[1].split("<h3>")[0]
    assert "upper_bound <em>(upper bound (static, all data))</em>" in summary_table
    assert summary_table.count('<tr class="reference">') == 1


def test_registered_metrics_in_the_report_and_results(tmp_path):
    plain, _ = make_run_dir(tmp_path / "plain", ["sequential", "replay"])
    run, summary = make_run_dir(tmp_path / "run", ["sequential", "replay"], hd95=True)
    # the headline files do not change when other metrics are logged
    for rel in ("R/sequential/pooled.csv", "R/sequential/h1.csv", "R/replay/h2.csv", "dice_by_round/sequential.csv"):
        assert (run / rel).read_bytes() == (plain / rel).read_bytes()
    for hid in ("pooled", "h1", "h2"):
        text = (run / "R" / "sequential" / f"{hid}.hd95.csv").read_text()
        assert text.startswith("after_stage,")
    assert not list((plain / "R" / "sequential").glob("*.hd95.csv"))
    seq = summary["arms"]["sequential"]["metrics"]["hd95"]
    assert seq["direction"] == "lower" and seq["chaudhry_forgetting"] > 0 and seq["bwt"] < 0  # A got worse after B
    h1 = seq["per_hospital"]["h1"]
    assert h1["chaudhry_forgetting"] == pytest.approx(h1["R"][1][0] - h1["R"][0][0]) and h1["chaudhry_forgetting"] > 0
    # headline, per hospital: A left h1's stream after round 3 and its HD95 grew by the end
    worse = hd95_value("sequential", "h1", "A", 6) - hd95_value("sequential", "h1", "A", 3)
    assert h1["forgetting"] == pytest.approx(worse) and worse > 0
    assert summary["arms"]["replay"]["metrics"]["hd95"]["chaudhry_forgetting"] <= 0  # replay keeps improving on A
    # arm level only C left every stream (h2's gradual transition C -> A ends in round 5): not forgotten
    assert list(seq["forgetting_by_domain"]) == ["C"] and seq["forgetting_by_domain"]["C"]["last_trained_round"] == 4
    assert seq["forgetting"] == 0.0 and seq["forgetting_by_domain"]["C"]["forgetting"] < 0
    assert seq["missed"] == pytest.approx(0.05) and "hd95" in summary["metric_labels"]
    html = write_report(run).read_text()
    summary_table = html.split('<h2 id="summary">')[1].split("<h3>")[0]
    assert "<th class=\"num\">HD95 ↓</th>" in summary_table and "HD95 missed ↓" in summary_table
    assert f"<td class=\"num\">{seq['mean']:.2f}</td>" in summary_table
    assert "<h3>Final HD95 per test domain" in html and "(5%)" in html
    definitions = html.split('<h2 id="definitions">')[1]
    assert "<dt>hd95</dt>" in definitions and "<dt>hd95_missed</dt>" in definitions
    assert "HD95" not in write_report(plain).read_text().split('<h2 id="summary">')[1].split("<h3>")[0]


def test_report_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "FAILED").write_text("KeyboardInterrupt: \n")
    with pytest.raises(ReportError, match="no summary.json .the run failed: KeyboardInterrupt"):
        write_report(empty)
    assert run_report(str(tmp_path / "missing")) == 2


def _is_colorbar(ax) -> bool:
    return getattr(ax, "_colorbar", None) is not None


def _labelled(fig) -> bool:
    """Every plot has both axis labels; a colour bar has its one (its long axis)."""
    axes = [ax for ax in fig.axes if ax.get_visible()]
    return bool(axes) and all(ax.get_xlabel() or ax.get_ylabel() for ax in axes) and all(
        ax.get_xlabel() and ax.get_ylabel() for ax in axes if not _is_colorbar(ax))


def test_every_axis_labelled():
    block = {"stages": [{"domain": "A", "first_round": 1, "last_round": 3}, {"domain": "B", "first_round": 4, "last_round": 6}],
             "R": [[0.7, 0.2], [0.5, 0.8]], "b": [0.2, None], "acc": 0.65, "bwt": -0.2, "fwt": 0.0}
    figs = [
        r_matrix_figure([("a", block), ("b", block), ("c", block), ("d", block)], "R"),
        dice_figure([{"title": "h1", "series": {("s", "A"): [(0, 0.2), (2, 0.6)]}, "stages": block["stages"],
                      "spans": [(2, 4)]}], ["s"], ["A", "B"], 6),
        pool_figure({"o": [(1, 1), (4, 2)]}, {"o": [(4, "h1", 1)]}, ["o"], 6),
        routing_figure({("o", "A"): [(2, 1.0), (4, 0.5)]}, ["o"], ["A"], 6),
        cost_figure({"s": [{"round": 0, "wall_time_s": 2.0, "evaluated": True},
                           {"round": 1, "wall_time_s": 1.0, "bytes_down": 10, "bytes_up": 5}]}, ["s"], 6),
    ]
    for fig in figs:
        assert _labelled(fig)
    heat = figs[0].axes[0]
    texts = [t.get_text() for t in heat.texts]
    assert texts == ["0.20", "n/a", "0.70", "0.20", "0.50", "0.80"]  # b row, then R row by row
    assert heat.get_ylabel() == "after stage i (domain@round)" and heat.get_xlabel().startswith("evaluated on")
    assert [t.get_text() for t in heat.get_yticklabels()] == ["untrained (r0)", "1: A@r3", "2: B@r6"]
    assert sum(1 for ax in figs[0].axes if not _is_colorbar(ax)) == 4
    assert [ax.get_ylabel() for ax in figs[0].axes if _is_colorbar(ax)] == ["Dice"]


def test_what_happened_names_the_change_and_what_each_arm_kept_or_lost():
    from simlab.report.story import what_happened

    scenario = {"hospitals": [{"id": "a", "drift": {"type": "abrupt", "domains": ["old", "new"], "at": [6]}},
                              {"id": "b", "drift": {"type": "none", "domain": "b1"}}]}
    left = lambda then, final: {"old": {"last_trained_round": 5, "then": then, "final": final,  # noqa: E731
                                        "forgetting": then - final}}
    summary = {"arms": {
        "sequential": {"forgetting_by_domain": left(0.8, 0.5), "final_dice": {"old": 0.5, "new": 0.9, "b1": 0.7}},
        "odex": {"forgetting_by_domain": left(0.8, 0.79), "final_dice": {"old": 0.79, "new": 0.9, "b1": 0.9},
                 "pool": {"pool_size_final": 2}},
        "upper_bound": {"uses_future_data": True, "breaks_no_rehearsal": True,
                        "forgetting_by_domain": left(0.8, 0.85), "final_dice": {"old": 0.85}}}}
    text = what_happened(summary, scenario)
    assert text.startswith("a: old, then new from round 6; b kept its domain.")
    assert "old left every stream after round 5" in text
    assert "sequential lost 0.30 Dice on old (0.80 → 0.50), ended at Dice 0.80 on the other test domains" in text
    assert "odex kept old (0.80 → 0.79)" in text and "grew a pool of 2 models" in text
    assert "upper_bound [upper bound (static, all data)] gained 0.05 on old" in text
    summary = {"arms": {"s": {"forgetting_by_domain": {}, "forgetting_note": "no domain left every stream",
                              "final_dice": {"b1": 0.7}}}}
    assert "No hospital's data changed" not in what_happened(summary, scenario)
    assert "no domain left every stream." in what_happened(summary, scenario)


def test_command_line_messages_are_not_wrapped_at_80_columns_in_a_pipe_or_log(monkeypatch, capsys):
    """Every simlab command prints through one console (``text_console``): outside a terminal a message
    naming a long path stays on one line (220 columns), unless $COLUMNS says otherwise."""
    from simlab.report.commands import text_console

    monkeypatch.delenv("COLUMNS", raising=False)
    message = "error: /tmp/" + "x" * 120 + "/sweep: holds a sweep of another scenario"
    text_console(stderr=True).print(message, highlight=False, markup=False)
    assert capsys.readouterr().err == message + "\n"
    monkeypatch.setenv("COLUMNS", "40")
    assert text_console().width == 40
