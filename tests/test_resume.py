"""Checkpoints and resuming: the file formats, the run log's rewind, the ODEx pool's round trip, the
hospital-side state store, and a run whose process is really killed (SIGKILL to its whole process
group, Ray included) and then resumed with ``simlab run --resume``: the final metrics.jsonl must be
byte-identical to an uninterrupted run's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from simlab.checkpoint import (CheckpointError, HospitalStateStore, checkpoint_path, load_checkpoint, read_meta,
                               save_checkpoint)
from simlab.cli import main
from simlab.runlog import RunLog

ROOT = Path(__file__).resolve().parents[1]

TINY = """\
name: tiny-resume
seed: 4
data: {{image_size: 32, cache_dir: {cache}}}
domains:
  A: {{}}
  B: {{scanner: {{contrast: inverted, noise: 0.03}}}}
hospitals:
  - {{id: h1, size: 8, drift: {{type: abrupt, domains: [A, B], at: [3]}}}}
  - {{id: h2, size: 8, label_fraction: 0.5, drift: {{type: none, domain: A}}}}
model: {{channels: [8, 16]}}
federation: {{rounds: 5, local_steps: 2, batch_size: 4, lr: 0.005}}
evaluation: {{every: 2, test_size: 4}}
arms:
  - {{name: odex, set: {{continual.method: odex}}}}
  - {{name: ewc, set: {{continual.method: ewc, federation.server_optimizer.name: adam}}}}
"""


# ------------------------------------------------------------------------------------------ file formats
def test_checkpoint_round_trip_is_exact(tmp_path):
    arrays = {"model/a.weight": np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32),
              "bank/h1": np.arange(6, dtype=np.float64).reshape(2, 3), "m1.h0/st.n": np.array(7)}
    path = tmp_path / "c.npz"
    save_checkpoint(path, {"round": 3, "last_trained": {"h1": 2}}, arrays)
    meta, back = load_checkpoint(path)
    assert meta["round"] == 3 and meta["last_trained"] == {"h1": 2} and read_meta(path)["round"] == 3
    assert list(back) == list(arrays)
    for k, v in arrays.items():
        assert back[k].dtype == v.dtype and np.array_equal(back[k], v)
    assert not list(tmp_path.glob("*.tmp"))
    assert read_meta(tmp_path / "none.npz") is None


def test_unreadable_checkpoint_names_the_file(tmp_path):
    bad = tmp_path / "odex.npz"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match="odex.npz: unreadable checkpoint"):
        load_checkpoint(bad)
    np.savez(tmp_path / "plain.npz", x=np.zeros(2))
    with pytest.raises(CheckpointError, match="plain.npz: not a simlab checkpoint"):
        load_checkpoint(tmp_path / "plain.npz")


def test_hospital_state_store_saves_loads_and_prunes(tmp_path):
    store = HospitalStateStore(tmp_path, "ewc-abc", "h1")
    for t in (1, 2, 4):
        store.save(t, {"fisher.w": np.full(3, float(t))})
    assert store.rounds() == [1, 2, 4]
    assert store.load(2)["fisher.w"].tolist() == [2.0, 2.0, 2.0]
    store.prune(keep_from=2)
    assert store.rounds() == [2, 4]
    with pytest.raises(CheckpointError, match=r"round-3.npz: this hospital's state after round 3 is missing.*\[2, 4\]"):
        store.load(3)
    with pytest.raises(ValueError, match=r"'\.\./x' starts with '\.'"):
        HospitalStateStore(tmp_path, "../x", "h1")
    with pytest.raises(ValueError, match="'a/b' holds a path separator"):
        HospitalStateStore(tmp_path, "ewc-abc", "a/b")


def test_run_log_rewind_drops_rows_after_the_checkpoint(tmp_path):
    log = RunLog(tmp_path, "a")
    log.metric(0, "h1", "A", "dice", 0.5)
    log.round_cost(0, wall_time_s=1.0)
    mark = log.sizes()
    log.metric(1, "h1", "A", "train_loss", 0.3)
    log.round_cost(1, wall_time_s=1.0)
    log.rewind(**mark)
    log.metric(1, "h1", "A", "train_loss", 0.25)
    log.round_cost(1, wall_time_s=2.0)
    log.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["value"]) for r in rows] == [(0, 0.5), (1, 0.25)]
    costs = [json.loads(x) for x in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert [(c["round"], c["wall_time_s"]) for c in costs] == [(0, 1.0), (1, 2.0)]
    log = RunLog(tmp_path, "a")
    with pytest.raises(ValueError, match="shorter"):
        log.rewind(10**6, 0)
    log.close()


# ------------------------------------------------------------------------------------------ server state
def _odex_federation(tmp_path, scenario_text: str):
    from simlab.federated.odex_server import OdexFederation
    from simlab.models.unet import build_model, state_to_numpy
    from simlab.scenario.schema import load_scenario

    path = tmp_path / "s.yaml"
    path.write_text(scenario_text)
    sc = load_scenario(path).arms["odex"]
    fed = OdexFederation(None, sc, RunLog(tmp_path, "odex"))
    model = build_model(sc.model, sc.num_classes)
    fed.setup_model(model, state_to_numpy(model))
    return fed


def test_odex_pool_survives_a_checkpoint_exactly(tmp_path):
    from simlab.continual.odex import fit_entry

    text = TINY.format(cache=tmp_path / "cache")
    fed = _odex_federation(tmp_path, text)
    rng = np.random.default_rng(1)
    fb = {k: fed.pool.members[0].state[k] for k in fed.fb_keys}

    def entry(t: int):
        return fit_entry(rng.standard_normal((24, 16)) + t, fb, fed.params.shift, t)

    fed.pool.members[0].history += [entry(1), entry(2)]
    fed.pool.members[0].trained_on.update({"A": 2})
    fork = fed.pool.add_fork(0, {k: v + 1 for k, v in fed.pool.members[0].state.items()}, entry(3), 3)
    fork.trained_on.update({"B": 1})
    fork.last_dice["h1"] = 0.61
    fed.pool.current, fed.pool.last_domain, fed.last_trained = {"h1": 1, "h2": 0}, {"h1": "B", "h2": "A"}, {"h1": 3, "h2": 3}
    meta, arrays = fed.snapshot(fed.pool.members[0].state)
    save_checkpoint(tmp_path / "c.npz", meta, arrays)
    meta, arrays = load_checkpoint(tmp_path / "c.npz")

    (tmp_path / "other").mkdir()
    other = _odex_federation(tmp_path / "other", text)
    other.restore(meta, arrays, fed.pool.members[0].state)
    assert list(other.pool.members) == [0, 1] and other.pool.next_id == 2
    assert ((other.pool.current, other.pool.last_domain, other.last_trained)
            == (fed.pool.current, fed.pool.last_domain, fed.last_trained))
    for m, mem in fed.pool.members.items():
        got = other.pool.members[m]
        assert (got.parent, got.born, got.trained_on, got.last_dice) == (mem.parent, mem.born, mem.trained_on,
                                                                          mem.last_dice)
        assert all(np.array_equal(got.state[k], v) for k, v in mem.state.items())
        assert len(got.history) == len(mem.history)
        for a, b in zip(got.history, mem.history):
            fa, fb_ = a.to_arrays(), b.to_arrays()
            assert fa.keys() == fb_.keys() and all(np.array_equal(fa[k], fb_[k]) for k in fa)
    z = np.random.default_rng(2).standard_normal((5, 16))
    for a, b in zip(other.pool.members[1].history, fork.history):
        assert np.array_equal(a.history_entry().normalized_scores(z, fed.params.shift),
                              b.history_entry().normalized_scores(z, fed.params.shift))


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path):
    from simlab.federated.federation import Federation, settings_hash
    from simlab.scenario.schema import load_scenario

    path = tmp_path / "s.yaml"
    path.write_text(TINY.format(cache=tmp_path / "cache"))
    sc = load_scenario(path).arms["ewc"]
    changed = load_scenario(path, ["federation.lr=0.1"]).arms["ewc"]
    assert settings_hash(sc) != settings_hash(changed)
    assert settings_hash(sc) == settings_hash(load_scenario(path, ["output.dir=elsewhere"]).arms["ewc"])
    assert settings_hash(sc) != settings_hash(load_scenario(path, seed=5).arms["ewc"])  # another seed: another run
    save_checkpoint(checkpoint_path(tmp_path, "ewc"), {"arm": "ewc", "rounds": 5, "settings": settings_hash(sc),
                                                        "round": 2}, {})
    fed = Federation(None, changed, RunLog(tmp_path, "ewc"), resume=True)
    with pytest.raises(CheckpointError, match=r"ewc.npz: written for settings=.*the scenario it started with"):
        fed.load({})


def test_hospital_without_state_dir_is_refused_at_identification():
    from flwr.app import ConfigRecord, Context, RecordDict

    from simlab.federated.client_app import _method_state, _state_store

    ctx = Context(run_id=1, node_id=1, node_config={"hospital-id": "h1"}, state=RecordDict(), run_config={})
    assert _state_store(ConfigRecord({}), ctx, "h1") is None
    with pytest.raises(ValueError, match="--node-config 'state-dir="):
        _state_store(ConfigRecord({"state-key": "ewc-1"}), ctx, "h1")
    assert _method_state(ConfigRecord({"state-round": 0}), ctx, None) == {}


# ------------------------------------------------------------------------------------------ a real kill
def _rounds(run_dir: Path) -> list[tuple[str, int]]:
    path = run_dir / "rounds.jsonl"
    if not path.exists():
        return []
    return [(c["arm"], c["round"]) for c in map(json.loads, path.read_text().splitlines()) if c]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny scenario (its file) and its run without interruption, to compare resumed runs with."""
    root = tmp_path_factory.mktemp("uninterrupted")
    scenario = root / "tiny.yaml"
    scenario.write_text(TINY.format(cache=root / "cache"))
    assert main(["run", str(scenario), "--out", str(root / "run"), "--quiet", "--no-report"]) == 0
    return scenario, root / "run"


def _start(scenario: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "simlab.cli", "run", str(scenario), "--out", str(out), "--quiet",
                             "--no-report"], cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(proc: subprocess.Popen, run_dir: Path, arm_round: tuple[str, int]) -> None:
    deadline = time.monotonic() + 600
    while arm_round not in _rounds(run_dir):
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before {arm_round}: {proc.stderr.read()}"
        assert time.monotonic() < deadline, f"{arm_round} never came"
        time.sleep(0.02)


def _resumes_to(cut: Path, ref: Path, capsys) -> None:
    capsys.readouterr()
    assert main(["run", "--resume", str(cut), "--quiet", "--no-report"]) == 0
    assert "resuming" in capsys.readouterr().out
    assert (cut / "metrics.jsonl").read_bytes() == (ref / "metrics.jsonl").read_bytes()
    assert _rounds(cut) == _rounds(ref)  # every round once, in order
    assert not (cut / "FAILED").exists() and not (cut / "hospital-state").exists()


@pytest.mark.flower
def test_killed_run_resumes_to_identical_metrics(uninterrupted, tmp_path, capsys):
    """The `simlab run` process group is SIGKILLed once ewc (the second arm, whose hospitals keep a
    Fisher between rounds and whose server keeps FedAdam's m and v) has logged round 2; `simlab run
    --resume` keeps the completed odex arm, continues ewc from its last checkpoint, and the files end
    as an uninterrupted run's (every evaluated round's Dice rows would show a lost Fisher, m or v)."""
    scenario, ref = uninterrupted
    cut = tmp_path / "killed"
    proc = _start(scenario, cut)
    try:
        _wait_for(proc, cut, ("ewc", 2))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert ("ewc", 5) not in _rounds(cut) and not (cut / "summary.json").exists()
    assert read_meta(checkpoint_path(cut, "odex"))["round"] == 5 and read_meta(checkpoint_path(cut, "ewc"))["round"] >= 1
    assert any((cut / "hospital-state").rglob("round-*.npz"))  # the hospitals' Fisher, saved on "their" disk
    _resumes_to(cut, ref, capsys)
    a, b = (json.loads((d / "summary.json").read_text())["arms"] for d in (cut, ref))
    assert a["ewc"]["acc"] == b["ewc"]["acc"] and a["odex"]["pool"] == b["odex"]["pool"]
    assert a["ewc"]["server_optimizer"] == "adam"


def test_flower_logs_nothing_once_a_stop_was_asked_for():
    """After the signal, Flower's engine threads log every message they can no longer deliver (with a
    traceback) while the run stops: those records are dropped; before a stop, and after the next run
    begins, Flower's records pass."""
    import logging

    from simlab import interrupt

    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    flwr_log, keep = logging.getLogger("flwr"), Keep()
    flwr_log.addHandler(keep)
    try:
        with interrupt.handle_signals():
            flwr_log.error("before the stop")
            interrupt.STOP.set()
            flwr_log.error("The actor pool is empty, unfit to process messages.")
        flwr_log.error("still stopping")
        with interrupt.handle_signals():  # the next run
            flwr_log.error("next run")
    finally:
        flwr_log.removeHandler(keep)
        interrupt.STOP.clear()
    assert seen == ["before the stop", "next run"]


@pytest.mark.flower
def test_one_sigint_stops_a_run_cleanly_and_it_resumes(uninterrupted, tmp_path, capsys):
    """One SIGINT (Ctrl-C) to `simlab run` while the odex arm trains: the process exits by itself with
    130, says where the run is and how to continue, prints no traceback, leaves FAILED naming the
    signal; `--resume` then ends with an uninterrupted run's files."""
    scenario, ref = uninterrupted
    cut = tmp_path / "stopped"
    proc = _start(scenario, cut)
    try:
        _wait_for(proc, cut, ("odex", 2))
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, stderr
    assert "stopped by SIGINT" in stderr and f"simlab run --resume {cut}" in " ".join(stderr.split())
    assert "Traceback" not in stderr, stderr
    assert (cut / "FAILED").read_text().strip() == "Interrupted: stopped by SIGINT"
    assert ("ewc", 1) not in _rounds(cut)
    _resumes_to(cut, ref, capsys)


def test_resume_command_line_errors(tmp_path, capsys):
    assert main(["run", "--resume", str(tmp_path)]) == 2
    assert "no run.json" in capsys.readouterr().err
    assert main(["run", "x.yaml", "--resume", str(tmp_path)]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["run", "--resume", str(tmp_path), "--set", "seed=2"]) == 2
    assert "cannot change it" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ server optimiser
def test_server_optimiser_state_survives_a_checkpoint_exactly(tmp_path):
    from simlab.aggregation import OptState
    from simlab.federated.federation import Federation
    from simlab.scenario.schema import load_scenario

    path = tmp_path / "s.yaml"
    path.write_text(TINY.format(cache=tmp_path / "cache"))
    sc = load_scenario(path, ["federation.server_optimizer.name=yogi"]).arms["ewc"]
    fed = Federation(None, sc, RunLog(tmp_path, "ewc"))
    g = np.random.default_rng(3)
    state = {"w": g.standard_normal((3, 4)).astype(np.float32), "n": np.array(2, dtype=np.int64)}
    for _ in range(2):
        state = fed.server_step(state, {"w": state["w"] + g.standard_normal((3, 4)).astype(np.float32), "n": state["n"]},
                                {"w"})
    meta, arrays = fed.snapshot(state)
    save_checkpoint(tmp_path / "c.npz", meta, arrays)
    meta, arrays = load_checkpoint(tmp_path / "c.npz")
    (tmp_path / "o").mkdir()
    other = Federation(None, sc, RunLog(tmp_path / "o", "ewc"))
    assert other.restore(meta, arrays, state)["w"].tobytes() == state["w"].tobytes()
    assert isinstance(other.opt_state, OptState) and other.opt_state.step == fed.opt_state.step == 2
    step = {"w": state["w"] - 0.5, "n": state["n"]}
    assert fed.server_step(state, step, {"w"})["w"].tobytes() == other.server_step(state, step, {"w"})["w"].tobytes()
