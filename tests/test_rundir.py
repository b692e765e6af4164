"""The run directory (simlab.rundir) and atomic writes (simlab.fileio), without any engine: arms are
"run" by functions that write synthetic metric rows, as a ServerApp would."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from simlab.checkpoint import checkpoint_path, save_checkpoint
from simlab.fileio import atomic_write, atomic_writer
from simlab.rundir import (RunDirError, arm_status, clear_failed, failure, fingerprinted_settings, make_run_dir,
                           mark_failed, read_finished_run, read_jsonl, read_run_info, resume_inputs, run_arms,
                           settings_fingerprint, start_run_dir, write_run_info)
from simlab.runlog import RunLog
from simlab.scenario.schema import load_scenario_dict, resolved_dict

RAW = {
    "name": "rundir-unit",
    "seed": 3,
    "data": {"image_size": 32},
    "domains": {"A": {}, "B": {"scanner": {"contrast": "inverted"}}},
    "hospitals": [{"id": "h1", "size": 4, "drift": {"type": "abrupt", "domains": ["A", "B"], "at": [3]}},
                  {"id": "h2", "size": 4, "drift": {"type": "none", "domain": "A"}}],
    "federation": {"rounds": 4},
    "evaluation": {"every": 2},
    "arms": [{"name": "seq", "set": {"continual.method": "sequential"}},
             {"name": "ewc", "set": {"continual.method": "ewc"}}],
}


def loaded_at(out):
    return load_scenario_dict({**RAW, "output": {"dir": str(out)}}, "unit.yaml")


def fake_arm(run_dir, value: float = 0.5):
    """An engine's ``run_arm``: logs every round's Dice and cost through the run log, as a ServerApp does."""
    calls = []

    def run_arm(arm, sc):
        calls.append(arm)
        log = RunLog(run_dir, arm)
        try:
            for t in range(sc.federation.rounds + 1):
                for h in sc.hospitals:
                    for d in sc.eval_domains:
                        log.metric(t, h.id, d, "dice", value + 0.01 * t)
                log.round_cost(t, bytes_down=10, bytes_up=5, failed=[])
        finally:
            log.close()

    return run_arm, calls


# ---------------------------------------------------------------------------------------- atomic write
def test_atomic_write_text_and_bytes_leave_no_temp_file(tmp_path):
    atomic_write(tmp_path / "a" / "x.txt", "héllo\n")
    atomic_write(tmp_path / "a" / "y.bin", b"\x00\x01")
    assert (tmp_path / "a" / "x.txt").read_bytes() == "héllo\n".encode()
    assert (tmp_path / "a" / "y.bin").read_bytes() == b"\x00\x01"
    atomic_write(tmp_path / "a" / "x.txt", "second")
    assert (tmp_path / "a" / "x.txt").read_text() == "second"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["x.txt", "y.bin"]
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a" / "x.txt").stat().st_mode & 0o777 == 0o666 & ~umask
    atomic_write(tmp_path / "key", b"secret", mode=0o600)
    assert (tmp_path / "key").stat().st_mode & 0o077 == 0


def test_a_writer_that_raises_leaves_the_old_file_whole(tmp_path):
    target = tmp_path / "c.npz"
    with atomic_writer(target) as fh:
        np.savez(fh, a=np.arange(3))
    before = target.read_bytes()
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_writer(target, fsync=True) as fh:
            fh.write(b"half of a new file")
            raise RuntimeError("disk on fire")
    assert target.read_bytes() == before
    with pytest.raises(KeyboardInterrupt):
        with atomic_writer(tmp_path / "new.txt") as fh:
            fh.write(b"partial")
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npz"]
    with np.load(target) as z:
        assert z["a"].tolist() == [0, 1, 2]


# ---------------------------------------------------------------------------------------- starting
def test_a_non_empty_directory_is_refused(tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("x")
    with pytest.raises(RunDirError, match="exists and is not empty"):
        make_run_dir(loaded_at(taken))
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match="exists and is not empty"):
        make_run_dir(loaded_at(tmp_path / "file"))
    (tmp_path / "empty").mkdir()
    assert make_run_dir(loaded_at(tmp_path / "empty")) == tmp_path / "empty"


def test_run_json_and_resume_inputs_read_what_start_wrote(tmp_path):
    loaded = loaded_at(tmp_path / "run")
    run_dir = start_run_dir(loaded, {"engine": "simulation"})
    assert yaml.safe_load((run_dir / "scenario.yaml").read_text()) == resolved_dict(loaded)
    path, again, info = resume_inputs(run_dir)
    assert path == run_dir and info["engine"] == "simulation" and list(again.arms) == ["seq", "ewc"]
    assert resolved_dict(again) == resolved_dict(loaded)
    write_run_info(run_dir, {**info, "flower_runs": {"seq": 7}})
    assert read_run_info(run_dir)["flower_runs"] == {"seq": 7}
    with pytest.raises(RunDirError, match="no run.json"):
        resume_inputs(tmp_path)
    (run_dir / "run.json").write_text("[1, 2]")
    with pytest.raises(RunDirError, match="run.json: unreadable"):
        resume_inputs(run_dir)


# ---------------------------------------------------------------------------------------- the arm loop
def test_run_arms_writes_results_that_the_reader_reads_back(tmp_path):
    loaded = loaded_at(tmp_path / "run")
    run_dir = start_run_dir(loaded, {"engine": "test"})
    run_arm, calls = fake_arm(run_dir)
    prepared = []
    summary = run_arms(run_dir, loaded, run_arm, resume=False, prepare=lambda: prepared.append(1))
    assert calls == ["seq", "ewc"] and prepared == [1]
    for name in ("R/seq/pooled.csv", "R/seq/h1.csv", "R/ewc/h2.csv", "dice_by_round/seq.csv", "summary.json"):
        assert (run_dir / name).is_file(), name
    assert summary["arms"]["seq"]["bytes_total"] == 5 * 15
    run = read_finished_run(run_dir)
    assert run.summary == json.loads(json.dumps(summary))
    assert run.scenario == resolved_dict(loaded)
    rows = run.metrics()
    assert len(rows) == 2 * 5 * 2 * 2 and rows[0] == {"arm": "seq", "round": 0, "hospital": "h1", "domain": "A",
                                                      "metric": "dice", "value": 0.5}
    assert run.metrics("ewc") == [r for r in rows if r["arm"] == "ewc"]
    assert [c["round"] for c in run.costs()] == [0, 1, 2, 3, 4] * 2


def test_resume_skips_completed_arms_and_keeps_their_wall_time(tmp_path):
    loaded = loaded_at(tmp_path / "run")
    run_dir = start_run_dir(loaded, {"engine": "test"})
    first, _ = fake_arm(run_dir)
    first("seq", loaded.arms["seq"])
    save_checkpoint(checkpoint_path(run_dir, "seq"), {"round": 4, "elapsed_s": 12.5}, {})
    save_checkpoint(checkpoint_path(run_dir, "ewc"), {"round": 1, "elapsed_s": 3.0}, {})
    assert arm_status(run_dir, "seq", loaded.arms["seq"]) == (True, 12.5)
    assert arm_status(run_dir, "ewc", loaded.arms["ewc"]) == (False, 3.0)
    run_arm, calls = fake_arm(run_dir)

    class Progress:
        def __init__(self):
            self.events = []

        def start_arm(self, arm, rounds):
            self.events.append(("start", arm, rounds))

        def round_done(self, arm, t):
            self.events.append(("done", arm, t))

    progress = Progress()
    summary = run_arms(run_dir, loaded, run_arm, resume=True, progress=progress)
    assert calls == ["ewc"]
    assert progress.events == [("start", "seq", 4), ("done", "seq", 4), ("start", "ewc", 4)]
    assert summary["arms"]["seq"]["wall_time_s"] == 12.5 and summary["arms"]["ewc"]["wall_time_s"] >= 3.0


def test_a_failing_arm_writes_failed_and_the_readers_say_why(tmp_path):
    loaded = loaded_at(tmp_path / "run")
    run_dir = start_run_dir(loaded, {"engine": "test"})

    def broken(arm, sc):
        raise ValueError(f"arm {arm} broke")

    with pytest.raises(ValueError, match="arm seq broke"):
        run_arms(run_dir, loaded, broken, resume=False)
    assert failure(run_dir) == "ValueError: arm seq broke"
    with pytest.raises(RunDirError, match=r"no summary.json \(the run failed: ValueError: arm seq broke\)"):
        read_finished_run(run_dir)
    clear_failed(run_dir)
    assert failure(run_dir) is None
    with pytest.raises(RunDirError, match=r"no summary.json \(unfinished or not a run directory\)"):
        read_finished_run(run_dir)
    mark_failed(run_dir, KeyboardInterrupt())
    assert failure(run_dir) == "KeyboardInterrupt:"
    with pytest.raises(RunDirError, match="not a run directory"):
        read_finished_run(tmp_path / "absent")


def test_readers_name_what_is_broken(tmp_path):
    (tmp_path / "summary.json").write_text("{not json")
    with pytest.raises(RunDirError, match=r"summary.json: not JSON"):
        read_finished_run(tmp_path)
    (tmp_path / "summary.json").write_text(json.dumps({"arms": {}}))
    with pytest.raises(RunDirError, match=r"summary.json: no arms"):
        read_finished_run(tmp_path)
    (tmp_path / "summary.json").write_text(json.dumps({"arms": {"a": {}}}))
    assert read_finished_run(tmp_path).scenario == {} and read_finished_run(tmp_path).metrics() == []
    (tmp_path / "metrics.jsonl").write_text('{"a": 1}\n\n{"a": \n')
    with pytest.raises(RunDirError, match=r"metrics.jsonl: line 3: not JSON"):
        read_jsonl(tmp_path / "metrics.jsonl")
    assert read_jsonl(tmp_path / "metrics.jsonl", must_contain='1}') == [{"a": 1}]


# ---------------------------------------------------------------------------------------- fingerprint
def test_fingerprint_rule():
    plain = {"name": "s", "seed": 1, "description": "prose", "output": {"dir": "/x"},
             "data": {"image_size": 32, "cache_dir": "/c"}, "federation": {"lr": 0.01}}
    before = json.dumps(plain, sort_keys=True)
    assert fingerprinted_settings(plain) == {"name": "s", "data": {"image_size": 32}, "federation": {"lr": 0.01}}
    assert json.dumps(plain, sort_keys=True) == before  # the input is not changed
    canonical = '{"data":{"image_size":32},"federation":{"lr":0.01},"name":"s"}'
    assert settings_fingerprint(plain) == hashlib.sha256(canonical.encode()).hexdigest()[:12]
    moved = {**plain, "seed": 2, "description": "", "output": {"dir": "/y"}, "data": {"image_size": 32, "cache_dir": "/d"}}
    assert settings_fingerprint(moved) == settings_fingerprint(plain)
    assert settings_fingerprint(moved, seed=True) != settings_fingerprint(plain, seed=True)
    assert settings_fingerprint({**plain, "federation": {"lr": 0.1}}) != settings_fingerprint(plain)


# ---------------------------------------------------------------------------------------- layering
def test_reading_a_run_imports_no_engine_and_no_torch():
    """compare and report read run directories through rundir; that must stay light and engine-free."""
    code = ("import sys, simlab.rundir, simlab.compare, simlab.report.html; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('flwr', 'torch') "
            "or m.startswith(('simlab.federated', 'simlab.engine', 'simlab.cli'))]; "
            "print(bad); sys.exit(int(bool(bad)))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def test_summary_keys_and_the_run_table_in_80_columns(tmp_path):
    import io

    from rich.console import Console

    from simlab.cli import print_summary

    loaded = loaded_at(tmp_path / "run")
    run_dir = start_run_dir(loaded, {"engine": "test"})
    summary = run_arms(run_dir, loaded, fake_arm(run_dir)[0], resume=False)
    a = summary["arms"]["seq"]
    assert a["forgetting"] is None and a["forgetting_by_domain"] == {}  # h2 still trains on A: nothing left
    assert "no test domain left every stream" in a["forgetting_note"]
    assert [a[k] for k in ("fwt", "gem_fwt", "chaudhry_forgetting")] == \
        [a["pooled"][k] for k in ("fwt", "gem_fwt", "chaudhry_forgetting")] and "forgetting" not in a["pooled"]
    h1 = a["per_hospital"]["h1"]  # A left h1's stream after round 2 and kept improving (0.52 -> 0.54)
    assert h1["forgetting"] == 0.0 and h1["forgetting_by_domain"]["A"]["forgetting"] == pytest.approx(-0.02)
    labels = summary["metric_labels"]
    assert "ODEx" in labels["fwt"] and "GEM" in labels["gem_fwt"] and "Chaudhry" in labels["chaudhry_forgetting"]
    assert "positive = Dice lost" in labels["forgetting"]
    console = Console(file=io.StringIO(), width=200)  # a pipe may be this wide: the output stays within 80
    print_summary(console, summary, tmp_path)
    lines = console.file.getvalue().splitlines()
    assert max(len(line) for line in lines if not line.startswith("run directory:")) <= 80
    assert any(line.startswith("│ forgetting ↓") and "n/a" in line for line in lines)
