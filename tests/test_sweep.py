"""``simlab run --seeds``: one run directory per seed under the sweep root, resumable, one table at the
end. Each seed's run is an ordinary run (tested through Flower elsewhere); here the engine is replaced
by a stand-in that writes a finished run directory, so the sweep's own logic runs in a second."""

from __future__ import annotations

import json

import pytest

import simlab.runner
from simlab.cli import main
from tests.test_compare import GOOD, make_run
from tests.test_federation import TINY


@pytest.fixture()
def fake_engine(monkeypatch):
    """run_scenario → a finished run whose lwf arm is 0.05 ACC better than sequential, whatever the seed."""
    calls = []

    def run_scenario(loaded, progress=None, resume_dir=None):
        sc = loaded.base
        calls.append((sc.seed, resume_dir))
        out = simlab.runner.Path(sc.output.dir)
        if resume_dir is not None:  # a stopped seed: finish it
            import shutil

            shutil.rmtree(out)
        acc = 0.5 + 0.01 * sc.seed
        make_run(out, {"sequential": {**GOOD, "acc": acc}, "lwf": {**GOOD, "acc": acc + 0.05}}, seed=sc.seed)
        (out / "run.json").write_text(json.dumps({"source": loaded.source, "raw": loaded.raw}))
        return out, json.loads((out / "summary.json").read_text())

    monkeypatch.setattr(simlab.runner, "run_scenario", run_scenario)
    return calls


def test_seeds_run_in_turn_resume_and_end_with_mean_std_and_paired_tables(tmp_path, capsys, fake_engine):
    scenario = tmp_path / "tiny.yaml"
    scenario.write_text(TINY.format(cache=tmp_path / "cache"))
    out = tmp_path / "sweep"
    argv = ["run", str(scenario), "--seeds", "3-4,7", "--paired", "sequential", "--out", str(out), "--quiet",
            "--no-report"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert [c[0] for c in fake_engine] == [3, 4, 7]
    assert json.loads((out / "sweep.json").read_text())["seeds"] == [3, 4, 7]
    assert "seeds 3,4,7: mean ± std (n runs)" in text and "0.547 ± 0.021 (3)" in text
    assert "arm − sequential, paired by seed" in text and "+0.050 ± 0.000 (3)" in text
    # again: finished seeds are kept; a seed that stopped (run.json, no summary) is resumed
    (out / "seed-4" / "summary.json").unlink()
    assert main(argv) == 0
    assert fake_engine[3:] == [(4, out / "seed-4")]
    assert "+0.050 ± 0.000 (3)" in capsys.readouterr().out
    # simlab compare reads the sweep root
    assert main(["compare", str(out), "--paired", "lwf"]) == 0
    assert "arm − lwf, paired by seed" in capsys.readouterr().out


def test_bad_seed_lists_and_option_mixes_are_refused_before_anything_runs(tmp_path, capsys, fake_engine):
    scenario = tmp_path / "tiny.yaml"
    scenario.write_text(TINY.format(cache=tmp_path / "cache"))
    out = tmp_path / "sweep"
    base = ["run", str(scenario), "--out", str(out), "--quiet"]
    for extra, message in ((["--seeds", "1,x"], "expected integers"), (["--seeds", "1,1"], "distinct"),
                           (["--seeds", "1", "--seed", "2"], "takes no --seed"),
                           (["--paired", "sequential"], "--paired needs --seeds")):
        assert main(base + extra) == 2
        assert message in capsys.readouterr().err
    assert main(base + ["--seeds", "1"]) == 0
    capsys.readouterr()
    assert main(base + ["--seeds", "2"]) == 2  # another sweep into the same root
    assert "holds a sweep of another scenario" in capsys.readouterr().err
    assert [c[0] for c in fake_engine] == [1]
