"""simlab as a Flower app, and ``engine.launcher: flwr-run``.

Fast: the repository's pyproject.toml is a valid Flower app whose FAB carries only itself and the
README (runs, caches and code dropped into the tree stay behind), the staged app packs that same FAB;
the ServerApp's run config (scenario from a file or from the run directory's run.json, the hospitals'
state directory); the launcher key (validation, left out of the settings fingerprint); the
federation config given to Flower; following rounds.jsonl for the progress bar.

Flower (marked ``flower``): one tiny arm (2 hospitals, 32 px, 2 rounds, EWC, whose hospitals keep
state between rounds) run in-process and through ``flwr run`` writes byte-identical metrics.jsonl
and the same run directory; a ServerApp that fails under ``flwr run`` ends ``simlab run`` with exit
status 1 and its message, in FAILED too.
"""

from __future__ import annotations

import json
import os
import zipfile
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest

from simlab.checkpoint import load_checkpoint
from simlab.config import ScenarioError
from simlab.engine.deployment import APP_FILES, default_app_dir, stage_app
from simlab.rundir import settings_fingerprint, start_run_dir
from simlab.runlog import last_round_logged
from simlab.scenario.schema import load_scenario, load_scenario_dict, resolved_dict

ROOT = Path(__file__).resolve().parents[1]

TINY = """\
name: tiny-flwr-run
seed: 3
data: {{image_size: 32, cache_dir: {cache}}}
domains:
  A: {{}}
  B: {{scanner: {{contrast: inverted, noise: 0.03}}}}
hospitals:
  - {{id: h1, size: 4, drift: {{type: abrupt, domains: [A, B], at: [2]}}}}
  - {{id: h2, size: 4, label_fraction: 0.5, drift: {{type: none, domain: A}}}}
model: {{channels: [8, 16]}}
federation: {{rounds: 2, local_steps: 1, batch_size: 4, lr: 0.005}}
continual: {{method: ewc}}
evaluation: {{every: 2, test_size: 4}}
"""
TIMINGS = ("wall_time_s", "train_s", "eval_s", "query_s", "score_s")  # rounds.jsonl: seconds measured
# a checkpoint's facts about the run rather than the experiment: seconds so far, the length of
# rounds.jsonl (its timings are floats of varying length), the random name of the hospitals' state
CHECKPOINT_RUN_FACTS = ("elapsed_s", "rounds_bytes", "run_key")


def _tiny(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY.format(cache=tmp_path / "cache"))
    return path


# ------------------------------------------------------------------------------------------- the app
def test_the_repository_is_a_flower_app_whose_fab_carries_only_its_pyproject_and_readme(tmp_path):
    from flwr.cli.build import build_fab_from_disk
    from flwr.cli.config_utils import load_and_validate

    assert default_app_dir() == ROOT
    config, warnings = load_and_validate(ROOT / "pyproject.toml")  # checks the components can be found
    assert warnings == []
    app = config["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "simlab.federated.flower_app:server_app",
                                 "clientapp": "simlab.federated.flower_app:client_app"}
    assert set(app["config"]) == {"scenario", "arm", "run-dir", "overrides", "resume", "hospital-state-dir"}

    tree = tmp_path / "checkout"  # a checkout with what a researcher's work leaves in it
    for name in APP_FILES:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_bytes((ROOT / name).read_bytes())
    (tree / "results" / "r1").mkdir(parents=True)
    (tree / "results" / "r1" / "metrics.jsonl").write_text("{}\n" * 1000)
    (tree / "simlab").mkdir()
    (tree / "simlab" / "stray.py").write_text("x = 1\n")
    (tree / "cache.json").write_text("{}")
    fab = build_fab_from_disk(tree)
    assert sorted(n for n in zipfile.ZipFile(BytesIO(fab)).namelist() if not n.startswith(".info/")) == \
        sorted(APP_FILES)
    assert build_fab_from_disk(stage_app(tree, tmp_path / "staged")) == fab  # the same FAB, byte for byte


def test_server_app_reads_the_scenario_from_a_file_or_the_run_directory(tmp_path):
    from simlab.federated.flower_app import DeployConfigError, hospital_state_dir, scenario_from_run_config

    sc = tmp_path / "s.yaml"
    sc.write_text(TINY.format(cache=tmp_path / "c") + "arms: [{name: a}, {name: b, set: {federation.lr: 0.1}}]\n")
    run = tmp_path / "run"
    run.mkdir()
    scenario, arm, run_dir = scenario_from_run_config(
        {"scenario": str(sc), "arm": "b", "run-dir": str(run), "overrides": json.dumps(["seed=9", "federation.rounds=3"])})
    assert (arm, run_dir, scenario.federation.lr, scenario.seed, scenario.federation.rounds) == ("b", run, 0.1, 9, 3)
    with pytest.raises(DeployConfigError, match="has 2 arms"):
        scenario_from_run_config({"scenario": str(sc), "run-dir": str(run)})
    with pytest.raises(DeployConfigError, match="not an arm"):
        scenario_from_run_config({"scenario": str(sc), "arm": "zz", "run-dir": str(run)})
    with pytest.raises(DeployConfigError, match="absolute"):
        scenario_from_run_config({"scenario": "s.yaml", "arm": "a", "run-dir": str(run)})
    with pytest.raises(DeployConfigError, match="'run-dir' is empty"):
        scenario_from_run_config({"scenario": str(sc), "arm": "a"})
    with pytest.raises(DeployConfigError, match="JSON list"):
        scenario_from_run_config({"scenario": str(sc), "arm": "a", "run-dir": str(run), "overrides": "{bad"})
    with pytest.raises(DeployConfigError, match="no usable run.json"):
        scenario_from_run_config({"arm": "a", "run-dir": str(run)})

    # no scenario file: the run directory's run.json, with the overrides and seed it was started with
    loaded = load_scenario(sc, ["federation.lr=0.02"], seed=11, out=str(tmp_path / "started"))
    started = start_run_dir(loaded, {"engine": "simulation"})
    sc.write_text("edited: after the start\n")  # the run does not change with the file
    scenario, arm, run_dir = scenario_from_run_config({"arm": "a", "run-dir": str(started)})
    assert (scenario, arm, run_dir) == (loaded.arms["a"], "a", started)
    with pytest.raises(DeployConfigError, match="needs a 'scenario' file"):
        scenario_from_run_config({"arm": "a", "run-dir": str(started), "overrides": '["seed=1"]'})

    assert hospital_state_dir({}) is None and hospital_state_dir({"hospital-state-dir": "/x/y"}) == "/x/y"
    with pytest.raises(DeployConfigError, match="absolute"):
        hospital_state_dir({"hospital-state-dir": "rel"})


# ------------------------------------------------------------------------------------ the launcher key
def test_launcher_is_validated_and_left_out_of_the_fingerprint(tmp_path):
    path = _tiny(tmp_path)
    base = load_scenario(path)
    flwr = load_scenario(path, ["engine.launcher=flwr-run"])
    assert base.base.engine.launcher == "in-process" and flwr.base.engine.launcher == "flwr-run"
    for a, b in ((resolved_dict(base), resolved_dict(flwr)), (resolved_dict(base)["resolved_arms"]["ewc"],
                                                              resolved_dict(flwr)["resolved_arms"]["ewc"])):
        assert a != b and settings_fingerprint(a, seed=True) == settings_fingerprint(b, seed=True)
    assert settings_fingerprint(resolved_dict(base)) != settings_fingerprint(
        resolved_dict(load_scenario(path, ["engine.cpus_per_client=2"])))
    with pytest.raises(ScenarioError, match=r"engine\.launcher") as exc:
        load_scenario(path, ["engine.launcher=ray"])
    assert "in-process" in str(exc.value)
    with pytest.raises(ScenarioError, match=r"engine\.cpus_per_client.*whole CPU cores"):
        load_scenario(path, ["engine.launcher=flwr-run", "engine.cpus_per_client=0.5"])
    assert load_scenario(path, ["engine.cpus_per_client=0.5"]).base.engine.cpus_per_client == 0.5
    with pytest.raises(ScenarioError, match=r"engine\.ray_address.*in-process"):
        load_scenario(path, ["engine.launcher=flwr-run", "engine.ray_address=auto"])


def test_federation_config_gives_flower_what_the_in_process_launcher_gives_ray(tmp_path):
    from simlab.engine.flwr_run import federation_config
    from simlab.engine.simulation import client_resources

    raw = {"name": "x", "domains": {"A": {}}, "engine": {"device": "cpu", "cpus_per_client": 1},
           "hospitals": [{"id": f"h{i}", "drift": {"type": "none", "domain": "A"}} for i in range(3)]}
    sc = load_scenario_dict(raw, "x.yaml").base
    cfg = federation_config(sc)
    res = client_resources(sc)
    assert cfg == {"num-supernodes": 3, "client-resources-num-cpus": 1, "client-resources-num-gpus": 0.0,
                   "init-args-num-cpus": os.cpu_count() or 1, "init-args-num-gpus": 0,
                   "init-args-logging-level": "ERROR", "init-args-log-to-driver": False}
    assert (cfg["client-resources-num-cpus"], cfg["client-resources-num-gpus"]) == (res["num_cpus"], res["num_gpus"])


def test_last_round_logged_follows_another_writer(tmp_path):
    assert last_round_logged(tmp_path, "a") is None
    rows = [{"arm": "a", "round": 0}, {"arm": "b", "round": 5}, {"arm": "a", "round": 1}]
    (tmp_path / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"arm": "a", "rou')
    assert (last_round_logged(tmp_path, "a"), last_round_logged(tmp_path, "b"), last_round_logged(tmp_path, "c")) \
        == (1, 5, None)


# ------------------------------------------------------------------------------------ through Flower
class _Progress:
    def __init__(self):
        self.rounds: dict[str, list[int]] = {}

    def data_tick(self):
        pass

    def start_arm(self, arm, rounds):
        self.rounds[arm] = []

    def round_done(self, arm, t):
        self.rounds[arm].append(t)


def _files(run_dir: Path) -> set[str]:
    return {str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file()}


def _superlinks_below_us() -> list[int]:
    from simlab.engine.procs import descendants

    found = []
    for pid in descendants(os.getpid()):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(Path(a.decode(errors="replace")).name == "flower-superlink" for a in argv[:2]):
            found.append(pid)
    return found


def _no_ray_kept_here() -> None:
    """Stop the Ray that in-process runs of this test process keep for the next arm: the simulation
    process of ``flwr run`` starts a Ray of its own, whose raylet gets 30 s (fixed in Ray) to register,
    which a busy 2-core machine running both can miss."""
    from simlab.engine.ray_session import shutdown

    shutdown()


@pytest.mark.flower
def test_flwr_run_and_in_process_give_byte_identical_metrics(tmp_path):
    from simlab.runner import run_scenario

    path = _tiny(tmp_path)
    dirs, summaries, progress = {}, {}, {}
    _no_ray_kept_here()
    for launcher in ("flwr-run", "in-process"):
        progress[launcher] = _Progress()
        loaded = load_scenario(path, [f"engine.launcher={launcher}"], out=str(tmp_path / launcher))
        dirs[launcher], summaries[launcher] = run_scenario(loaded, progress[launcher])
    a, b = dirs["in-process"], dirs["flwr-run"]
    print("wall time of the arm:", {k: s["arms"]["ewc"]["wall_time_s"] for k, s in summaries.items()})

    metrics = (a / "metrics.jsonl").read_bytes()
    assert len(metrics.splitlines()) > 30 and b"train_loss" in metrics
    assert (b / "metrics.jsonl").read_bytes() == metrics
    assert _files(b) == _files(a) | {"flower-ewc.log"}  # hospital-state/ removed after the arm by both
    for name in sorted(_files(a)):
        if name.startswith(("R/", "dice_by_round/")):
            assert (b / name).read_bytes() == (a / name).read_bytes(), name
    (meta_a, arrays_a), (meta_b, arrays_b) = (load_checkpoint(d / "checkpoints" / "ewc.npz") for d in (a, b))
    assert list(arrays_b) == list(arrays_a) and all(np.array_equal(arrays_b[k], arrays_a[k]) for k in arrays_a)
    assert {k: v for k, v in meta_b.items() if k not in CHECKPOINT_RUN_FACTS} == \
        {k: v for k, v in meta_a.items() if k not in CHECKPOINT_RUN_FACTS}

    def untimed(run_dir):
        rows = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows]

    assert untimed(b) == untimed(a) and len(untimed(a)) == 3  # rounds 0, 1, 2
    for s in summaries.values():
        s["arms"]["ewc"].pop("wall_time_s")
    assert summaries["flwr-run"] == summaries["in-process"]
    assert progress["flwr-run"].rounds["ewc"][-1] == 2 and progress["in-process"].rounds["ewc"] == [0, 1, 2]
    assert "Flower run" in (b / "simlab.log").read_text()  # the ServerApp logged into the run directory
    assert _superlinks_below_us() == []


@pytest.mark.flower
def test_a_failing_server_app_under_flwr_run_fails_the_command(tmp_path, capsys):
    """No hospital can answer within 1 ms, so the ServerApp raises in its identification step: Flower
    ends the run finished:failed (behind an exit code of 0 from `flwr run`), `simlab run` exits 1."""
    from simlab.cli import main

    out = tmp_path / "run"
    _no_ray_kept_here()
    rc = main(["run", str(_tiny(tmp_path)), "--out", str(out), "--quiet", "--no-report",
               "--set", "engine.launcher=flwr-run", "--set", "federation.round_timeout_s=0.001"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "finished:failed" in err and "no node answered for hospital(s) h1, h2" in err
    assert "no node answered for hospital(s) h1, h2" in (out / "FAILED").read_text()
    assert "FederationError" in (out / "flower-ewc.log").read_text()
    assert not (out / "summary.json").exists()
    assert _superlinks_below_us() == []
