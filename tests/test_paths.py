"""The one guard of every path a run writes (:func:`simlab.fileio.run_path`): its properties on names
that would leave the run directory (``..``, separators, absolute paths, empty, NUL and other control
characters, names too long, symbolic links pointing out), and a whole run, with its report, made in
this process while the guard records every call: every file the run leaves in its directory (and the
hospitals' saved state, before it is removed) was made through the guard, and nothing was written
anywhere else."""

from __future__ import annotations

import os
import random
import sys
import textwrap
from contextlib import nullcontext
from pathlib import Path

import pytest

from simlab.fileio import MAX_NAME_BYTES, UnsafePathError, name_problem, run_path


# ----------------------------------------------------------------------------------- the guard
@pytest.mark.parametrize("part, why", [
    ("..", "starts with '.'"),
    (".", "starts with '.'"),
    (".csv", "starts with '.'"),  # an empty hospital id before ".csv"
    ("", "is empty"),
    ("a/b", "holds a path separator"),
    ("/etc/passwd", "holds a path separator"),
    ("../../escaped", "starts with '.'"),
    ("x/../../y", "holds a path separator"),
    ("a\\b", "holds a path separator"),
    ("a\x00b", "holds a control character"),
    ("a\nb", "holds a control character"),
    ("tab\there", "holds a control character"),
    ("del\x7f", "holds a control character"),
    ("x" * (MAX_NAME_BYTES + 1), f"is 256 bytes long (file names take at most {MAX_NAME_BYTES})"),
    ("é" * 128, "is 256 bytes long"),  # 128 characters, 2 bytes each
    ("\udc80-lone-surrogate\ud800", "cannot be encoded as a file name"),
    (7, "is not text (int)"),
    (Path("a"), "is not text (PosixPath)"),
])
def test_a_part_that_is_not_one_safe_name_is_refused_naming_it(tmp_path, part, why):
    with pytest.raises(UnsafePathError) as err:
        run_path(tmp_path, "R", part, "h.csv")
    assert f"{part!r} {why}" in str(err.value) and str(tmp_path) in str(err.value)
    assert "validation should have refused" in str(err.value)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("parts", [("summary.json",), ("R", "ewc", "st-mary.hd95.csv"), ("x" * MAX_NAME_BYTES,),
                                   ("é" * 127,), ("hospital-state", "ewc-1a2b", "h1", "round-3.npz"),
                                   ("flower-odex_abl.log",), ("a b", "ü.csv")])
def test_safe_names_give_the_path_below_the_run_directory(tmp_path, parts):
    path = run_path(tmp_path, *parts)
    assert path == tmp_path.joinpath(*parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("x")
    assert path.resolve().is_relative_to(tmp_path.resolve())


def test_no_part_at_all_is_refused(tmp_path):
    with pytest.raises(UnsafePathError, match="no name given"):
        run_path(tmp_path)


def test_random_names_either_stay_one_entry_of_the_run_directory_or_are_refused(tmp_path):
    """Property, on 3,000 seeded random names over an alphabet of separators, dots, control characters
    and non-ASCII letters: an accepted name is created as exactly one new entry of the directory; a
    refused one gives a reason and creates nothing."""
    rng = random.Random(16)
    alphabet = ["a", "Z", "0", "-", "_", " ", ".", "/", "\\", "\x00", "\n", "\x1b", "é", "中", "~", ":", "*"]
    accepted = refused = 0
    for _ in range(3000):
        name = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))
        before = set(os.listdir(tmp_path))
        try:
            path = run_path(tmp_path, name)
        except UnsafePathError:
            refused += 1
            assert name_problem(name) is not None and set(os.listdir(tmp_path)) == before
            continue
        accepted += 1
        path.write_bytes(b"")
        assert path.parent == tmp_path and set(os.listdir(tmp_path)) - before <= {name}
        assert name in os.listdir(tmp_path)
    assert accepted > 500 and refused > 500  # both sides of the property were exercised


def test_a_symbolic_link_that_leaves_the_run_directory_is_refused(tmp_path):
    run, outside = tmp_path / "run", tmp_path / "elsewhere"
    run.mkdir()
    outside.mkdir()
    (run / "R").symlink_to(outside)  # a folder inside pointing out
    (outside / "target.json").write_text("keep")
    (run / "summary.json").symlink_to(outside / "target.json")  # a file inside pointing out
    (run / "checkpoints").symlink_to("..")  # relative, to the run directory's parent
    for parts in (("R", "ewc", "h1.csv"), ("summary.json",), ("checkpoints", "ewc.npz")):
        with pytest.raises(UnsafePathError, match=f"resolves to {outside.parent}.*outside {run}"):
            run_path(run, *parts)
    assert (outside / "target.json").read_text() == "keep" and os.listdir(outside) == ["target.json"]


def test_links_that_stay_inside_and_a_run_directory_reached_through_a_link_are_fine(tmp_path):
    real = tmp_path / "disk" / "run"
    (real / "reports-v2").mkdir(parents=True)
    (real / "report").symlink_to("reports-v2")
    (tmp_path / "runs").symlink_to(tmp_path / "disk")  # runs/ on another disk
    path = run_path(tmp_path / "runs" / "run", "report", "index.html")
    path.write_text("ok")
    assert (real / "reports-v2" / "index.html").read_text() == "ok"


def test_the_hospital_state_store_and_checkpoints_use_the_guard(tmp_path):
    from simlab.checkpoint import HospitalStateStore, checkpoint_path

    with pytest.raises(UnsafePathError, match="'' is empty"):
        HospitalStateStore(tmp_path, "ewc-1", "")
    with pytest.raises(UnsafePathError, match="holds a path separator"):
        checkpoint_path(tmp_path, "x/../../y")
    assert checkpoint_path(tmp_path, "ewc") == tmp_path / "checkpoints" / "ewc.npz"


def test_results_of_a_hospital_id_that_got_past_validation_are_not_written(tmp_path):
    """The R matrices of a hospital named ``../../escaped`` (built past validation): the guard stops the
    results, FAILED names the part, and nothing appears outside the run directory."""
    import dataclasses

    from simlab.rundir import run_arms, start_run_dir
    from simlab.runlog import RunLog
    from simlab.scenario.schema import load_scenario_dict

    run = tmp_path / "deep" / "er" / "run"
    loaded = load_scenario_dict({**RAW, "output": {"dir": str(run)}}, "unit.yaml")
    bad = "../../escaped"
    arms = {name: dataclasses.replace(sc, hospitals=[dataclasses.replace(sc.hospitals[0], id=bad),
                                                     *sc.hospitals[1:]]) for name, sc in loaded.arms.items()}
    loaded = dataclasses.replace(loaded, arms=arms)
    run_dir = start_run_dir(loaded, {"engine": "test"})

    def run_arm(arm, sc):
        log = RunLog(run_dir, arm)
        for t in range(sc.federation.rounds + 1):
            for h in sc.hospitals:
                log.metric(t, h.id, "A", "dice", 0.5)
            log.round_cost(t, bytes_down=1, bytes_up=1, failed=[])
        log.close()

    before = {p for p in tmp_path.rglob("*") if not p.is_relative_to(run)}
    with pytest.raises(UnsafePathError, match=r"'\.\./\.\./escaped\.csv' starts with '\.'"):
        run_arms(run_dir, loaded, run_arm, resume=False)
    assert "UnsafePathError" in (run / "FAILED").read_text()
    assert {p for p in tmp_path.rglob("*") if not p.is_relative_to(run)} == before


RAW = {"name": "paths", "seed": 2, "data": {"image_size": 32}, "domains": {"A": {}},
       "hospitals": [{"id": "h1", "size": 4, "drift": {"type": "none", "domain": "A"}},
                     {"id": "h2", "size": 4, "drift": {"type": "none", "domain": "A"}}],
       "federation": {"rounds": 2}}


# ----------------------------------------------------------------------------------- every writer
TINY = """\
name: tiny
seed: 4
data: {image_size: 32}
domains:
  A: {}
  B: {scanner: {contrast: inverted}}
hospitals:
  - {id: st-mary, size: 4, drift: {type: abrupt, domains: [A, B], at: [2]}}
  - {id: city, size: 4, drift: {type: none, domain: A}}
model: {channels: [4, 8]}
federation: {rounds: 2, local_steps: 1, batch_size: 4}
evaluation: {every: 1, test_size: 2}
arms:
  - {name: ewc, set: {continual.method: ewc}}
  - {name: fedbn, set: {federation.norm: local}}
"""


@pytest.fixture
def recorded(monkeypatch):
    """Every path the guard gives out (resolved), with every simlab module's reference to the guard
    replaced by a recording one; Ray and Flower's engine replaced by :mod:`local_flower`, so that the
    ClientApp's writes happen in this process too."""
    import flwr.simulation

    import simlab.cli  # noqa: F401  (every writer's module is loaded before the guard is replaced)
    import simlab.engine.flwr_run  # noqa: F401
    import simlab.engine.simulation as simulation
    import simlab.federated.flower_app  # noqa: F401
    import simlab.fileio as fileio
    import simlab.report.html  # noqa: F401
    import simlab.runner  # noqa: F401
    from local_flower import run_locally

    original, calls = fileio.run_path, []

    def recording(run_dir, *parts):
        path = original(run_dir, *parts)
        calls.append(Path(path).resolve())
        return path

    patched = [m for m in list(sys.modules.values())
               if getattr(m, "__name__", "").startswith("simlab") and getattr(m, "run_path", None) is original]
    for module in patched:
        monkeypatch.setattr(module, "run_path", recording)
    assert {"simlab.rundir", "simlab.checkpoint", "simlab.runlog", "simlab.runner", "simlab.report.html",
            "simlab.engine.simulation", "simlab.federated.flower_app"} <= {m.__name__ for m in patched}
    monkeypatch.setattr(flwr.simulation, "run_simulation", run_locally)
    monkeypatch.setattr(simulation, "shared_ray", lambda init_args: nullcontext())
    return calls


def files_under(root: Path) -> set[Path]:
    return {p.resolve() for p in root.rglob("*") if p.is_file()}


def test_every_file_a_run_writes_goes_through_the_guard(recorded, tmp_path, monkeypatch, capsys):
    import simlab.runner
    from simlab.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SIMLAB_CACHE", str(tmp_path / "cache"))
    (tmp_path / "tiny.yaml").write_text(textwrap.dedent(TINY))
    run = tmp_path / "runs" / "tiny"
    states: set[Path] = set()
    real_rmtree = simlab.runner.shutil.rmtree

    def rmtree_seeing_the_state(path, *args, **kwargs):  # the hospitals' saved state, before it is removed
        states.update(files_under(Path(path)))
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(simlab.runner.shutil, "rmtree", rmtree_seeing_the_state)
    before = {p for p in tmp_path.rglob("*")}
    assert main(["run", "tiny.yaml", "--out", str(run), "--quiet"]) == 0, capsys.readouterr().err

    written = files_under(run)
    assert any(p.parts[-4] == "hospital-state" for p in states)  # EWC and FedBN saved state at the hospitals
    assert {"metrics.jsonl", "rounds.jsonl", "simlab.log", "summary.json", "run.json", "scenario.yaml", "index.html",
            "ewc.npz", "st-mary.csv", "city.hd95.csv", "R_city.png"} <= {p.name for p in written}
    unguarded = sorted(str(p.relative_to(run.resolve())) for p in (written | states) - set(recorded))
    assert unguarded == []
    assert all(p.is_relative_to(run.resolve()) for p in recorded)
    assert {p for p in tmp_path.rglob("*") if not p.is_relative_to(run) and not p.is_relative_to(tmp_path / "cache")} \
        == before | {tmp_path / "runs"}


def test_the_server_app_of_flwr_run_writes_its_log_through_the_guard(recorded, tmp_path, monkeypatch):
    """``engine.launcher: flwr-run`` and a deployment start the ServerApp of ``flower_app``, which reads the
    scenario from run.json and adds its own handler for ``simlab.log``."""
    from local_flower import LocalGrid, node_context, task_identity
    from simlab.federated.client_app import app as client_app
    from simlab.federated.flower_app import server_app
    from simlab.rundir import start_run_dir
    from simlab.scenario.schema import load_scenario_dict

    monkeypatch.setenv("SIMLAB_CACHE", str(tmp_path / "cache"))
    loaded = load_scenario_dict({**RAW, "output": {"dir": str(tmp_path / "run")}}, "unit.yaml")
    run_dir = start_run_dir(loaded, {"engine": "simulation"})
    recorded.clear()
    context = node_context(0, {})
    context.run_config = {"run-dir": str(run_dir), "arm": "", "resume": False,
                          "hospital-state-dir": str(run_dir / "hospital-state")}
    with task_identity():
        server_app(LocalGrid(client_app, [{"partition-id": 0}, {"partition-id": 1}]), context)
    assert {run_dir / "simlab.log", run_dir / "metrics.jsonl", run_dir / "rounds.jsonl"} <= set(recorded)
    assert files_under(run_dir) - set(recorded) == {run_dir / "run.json", run_dir / "scenario.yaml"}
