"""The strategies taken from Flower's (FedProx, FedAdam, Multi-Krum, and a server optimiser per ODEx
member), each as an arm of one tiny run through Flower's simulation engine. FedYogi and FedAdagrad
share FedAdam's path through the server (only the second-moment update differs, cross-checked
against Flower in tests/test_strategies.py), so they take no engine start of their own."""

from __future__ import annotations

import json

import pytest

from simlab.cli import main

TINY = """\
name: tiny-strategies
seed: 2
data: {{image_size: 32, cache_dir: {cache}}}
domains:
  A: {{}}
  B: {{scanner: {{contrast: inverted, noise: 0.03}}}}
hospitals:
  - {{id: h1, size: 8, drift: {{type: abrupt, domains: [A, B], at: [2]}}}}
  - {{id: h2, size: 8, drift: {{type: none, domain: A}}}}
  - {{id: h3, size: 8, drift: {{type: none, domain: A}}}}
model: {{channels: [8, 16]}}
federation: {{rounds: 2, local_steps: 2, batch_size: 4, lr: 0.005}}
evaluation: {{every: 2, test_size: 4}}
arms:
  - {{name: fedprox, set: {{federation.proximal_mu: 0.1}}}}
  - {{name: fedadam, set: {{federation.server_optimizer.name: adam}}}}
  - {{name: multikrum, set: {{federation.aggregation.rule: krum, federation.aggregation.krum.num_nodes_to_select: 2}}}}
  - {{name: odex-adam, set: {{continual.method: odex, federation.server_optimizer.name: adam}}}}
"""


@pytest.mark.flower
def test_flower_strategies_run_end_to_end(tmp_path):
    scenario = tmp_path / "s.yaml"
    scenario.write_text(TINY.format(cache=tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(["run", str(scenario), "--out", str(out), "--quiet", "--no-report"]) == 0
    arms = json.loads((out / "summary.json").read_text())["arms"]
    assert {a: (s["aggregation"], s["server_optimizer"], s["proximal_mu"]) for a, s in arms.items()} == {
        "fedprox": ("fedavg", "none", 0.1), "fedadam": ("fedavg", "adam", 0.0),
        "multikrum": ("krum", "none", 0.0), "odex-adam": ("fedavg", "adam", 0.0)}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for arm, s in arms.items():
        assert s["failed_updates"] == 0 and s["skipped_rounds"] == 0, arm
        assert {r["round"] for r in rows if r["arm"] == arm and r["metric"] == "train_loss"} == {1, 2}, arm
        assert not [r for r in rows if r["arm"] == arm and r["metric"] in ("train_failed", "update_rejected")], arm
    kept = [r for r in rows if r["arm"] == "multikrum" and r["metric"] == "agg_weight" and r["value"] > 0]
    assert sorted(r["round"] for r in kept) == [1, 1, 2, 2]  # two of three hospitals kept per round
