"""`simlab compare`: grouping over seeds, baselines, direction-aware tolerances, a planted regression.

Most tests build small run directories by hand (summary.json, scenario.yaml, metrics.jsonl with the
fields a real run writes); the last one runs a tiny scenario through Flower twice, once with a
learning rate too small to learn anything, and checks that the baseline of the good run catches it.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from simlab.baseline import check_against_baseline, is_regression, parse_tolerance_args, read_baseline
from simlab.compare import METRICS, SPECS, SUMMARY_KEYS, CompareError, Stat, Tolerance, group_runs, load_run
from simlab.metrics.registry import REGISTRY
from simlab.report.commands import add_subcommands, dispatch, run_compare

GOOD = {"acc": 0.70, "bwt": -0.10, "fwt": 0.20, "gem_fwt": 0.15, "forgetting": 0.12, "chaudhry_forgetting": 0.14,
        "forgetting_by_domain": {}, "bytes_total": 4_000_000, "wall_time_s": 30.0}


def make_run(path, arms: dict[str, dict], seed=0, name="synth", lr=0.002, pool: dict[str, list[int]] | None = None):
    """A run directory with the files compare reads: summary.json, scenario.yaml, metrics.jsonl."""
    path.mkdir(parents=True)
    summary = {"scenario": name, "seed": seed, "metric_labels": {}, "arms": {}}
    for arm, values in arms.items():
        method = next((m for m in ("replay", "upper_bound") if arm.startswith(m)), "sequential")
        summary["arms"][arm] = {"method": method, "aggregation": "fedavg", "breaks_no_rehearsal": method != "sequential",
                                "uses_future_data": method == "upper_bound", **values}
    (path / "summary.json").write_text(json.dumps(summary))
    scenario = {"name": name, "seed": seed, "description": "", "federation": {"lr": lr, "rounds": 4},
                "data": {"image_size": 32, "cache_dir": str(path / "cache")}, "output": {"dir": str(path)}}
    (path / "scenario.yaml").write_text(yaml.safe_dump(scenario))
    rows = [{"arm": a, "round": 1, "hospital": "h1", "domain": "A", "metric": "train_loss", "value": 1.0} for a in arms]
    for arm, sizes in (pool or {}).items():
        rows += [{"arm": arm, "round": t, "hospital": "server", "domain": None, "metric": "pool_size", "value": k}
                 for t, k in enumerate(sizes, start=1)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def compare(capsys, *argv: str) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="simlab")
    add_subcommands(parser.add_subparsers(dest="command"))
    rc = dispatch(parser.parse_args(["compare", *argv]))
    cap = capsys.readouterr()
    return rc, cap.out + cap.err


# ------------------------------------------------------------------------------ tolerances
@pytest.mark.parametrize("direction, base, current, tol, regressed", [
    # higher is better (acc, bwt, fwt)
    ("higher", 0.70, 0.69, "abs:0.02", False),
    ("higher", 0.70, 0.67, "abs:0.02", True),
    ("higher", 0.70, 0.95, "abs:0.00", False),  # better never fails, even with zero tolerance
    ("higher", -0.10, -0.14, "rel:0.5", False),  # allowed 0.05 (relative to |mean|)
    ("higher", -0.10, -0.16, "rel:0.5", True),
    # lower is better (forgetting, bytes, wall time)
    ("lower", 0.10, 0.12, "abs:0.03", False),
    ("lower", 0.10, 0.14, "abs:0.03", True),
    ("lower", 0.10, -0.50, "abs:0.00", False),
    ("lower", 100.0, 149.0, "rel:0.5", False),
    ("lower", 100.0, 151.0, "rel:0.5", True),
    ("lower", 100.0, 1.0, "rel:0.0", False),
    ("lower", 0.0, 0.01, "rel:10", True),  # relative to a zero mean: nothing allowed
    # either way (pool size)
    ("either", 3.0, 3.0, "abs:0", False),
    ("either", 3.0, 4.0, "abs:0", True),
    ("either", 3.0, 2.0, "abs:0", True),
    ("either", 3.0, 4.0, "abs:1", False),
])
def test_direction_aware_tolerances(direction, base, current, tol, regressed):
    assert is_regression(direction, base, current, Tolerance.parse(tol)) is regressed


def test_tolerance_parsing_and_errors():
    assert Tolerance.parse("abs:0.02") == Tolerance("abs", 0.02)
    assert Tolerance.parse("rel:1.5").allowed(-4.0) == pytest.approx(6.0)
    assert str(Tolerance.parse("rel:0.50")) == "rel:0.5"
    for bad, msg in [("0.02", "abs:X"), ("pct:3", "abs:X"), ("abs:x", "number"), ("abs:-1", ">= 0"), ("rel:nan", ">= 0")]:
        with pytest.raises(CompareError, match=msg):
            Tolerance.parse(bad)
    assert parse_tolerance_args(["acc=abs:0.01", "wall_time_s=rel:2"]) == {
        "acc": Tolerance("abs", 0.01), "wall_time_s": Tolerance("rel", 2.0)}
    with pytest.raises(CompareError, match="unknown metric 'dice'"):
        parse_tolerance_args(["dice=abs:0.1"])
    with pytest.raises(CompareError, match="METRIC=abs:X"):
        parse_tolerance_args(["acc"])


# -------------------------------------------------------------------------------- grouping
def test_seeds_grouped_mean_std(tmp_path):
    accs = [0.61, 0.66, 0.70]
    runs = [load_run(make_run(tmp_path / f"s{s}", {"sequential": {**GOOD, "acc": a}, "replay": GOOD}, seed=s))
            for s, a in enumerate(accs)]
    other = load_run(make_run(tmp_path / "lr", {"sequential": GOOD, "replay": GOOD}, seed=0, lr=0.1))
    groups = group_runs([*runs, other])
    assert len(groups) == 2 and groups[0].seeds == [0, 1, 2] and groups[1].seeds == [0]
    st = groups[0].stats["sequential"]["acc"]
    assert st.n == 3
    assert st.mean == pytest.approx(np.mean(accs))
    assert st.std == pytest.approx(np.std(accs, ddof=1))
    assert groups[0].stats["replay"]["acc"] == Stat(0.70, 0.0, 3)
    assert "pool_size" not in groups[0].stats["sequential"]  # no pool rows: absent, not zero
    assert Stat.of([0.5], "x") == Stat(0.5, 0.0, 1)
    assert Stat.of([None, None], "x") == Stat(None, 0.0, 0)
    with pytest.raises(CompareError, match="defined in 1 of 2 runs"):
        Stat.of([0.5, None], "arm a, metric bwt")


def test_paired_differences_pair_arms_within_a_run_and_a_sweep_root_expands(tmp_path, capsys):
    """Seed-to-seed spread shared by both arms cancels: sequential's ACC varies by 0.09 over seeds, the
    replay arm is always 0.05 better, so the paired difference is +0.05 ± 0."""
    accs = [0.61, 0.66, 0.70]
    root = tmp_path / "sweep"
    for s, a in enumerate(accs):
        make_run(root / f"seed-{s}", {"sequential": {**GOOD, "acc": a}, "replay": {**GOOD, "acc": a + 0.05}}, seed=s)
    (root / "sweep.json").write_text(json.dumps({"scenario": "x.yaml", "overrides": [], "seeds": [0, 1, 2]}))
    from simlab.compare import paired_differences

    group = group_runs([load_run(root / f"seed-{s}") for s in range(3)])[0]
    diff = paired_differences(group, "sequential")
    assert set(diff) == {"replay"}
    assert diff["replay"]["acc"].mean == pytest.approx(0.05) and diff["replay"]["acc"].std == pytest.approx(0.0, abs=1e-12)
    assert diff["replay"]["bwt"] == Stat(0.0, 0.0, 3)
    with pytest.raises(CompareError, match="no such arm"):
        paired_differences(group, "ewc")
    rc, out = compare(capsys, str(root), "--paired", "sequential")
    assert rc == 0 and "seeds 0,1,2" in out and "replay − sequential" not in out
    assert "arm − sequential, paired by seed" in out and "+0.050 ± 0.000 (3)" in out
    # the synthetic runs record no family: it comes from the method registry
    assert "family" in out and "rehearsal" in out and "baseline" in out


def test_compare_table_and_settings_diff(tmp_path, capsys):
    arms = {"sequential": GOOD, "replay": GOOD, "upper_bound": GOOD}
    a = make_run(tmp_path / "a", arms, seed=0)
    b = make_run(tmp_path / "b", {**arms, "sequential": {**GOOD, "acc": 0.60}}, seed=1)
    c = make_run(tmp_path / "c", arms, seed=0, lr=0.05)
    rc, out = compare(capsys, str(a), str(b), str(c))
    assert rc == 0
    assert "0.650 ± 0.071 (2)" in out  # acc of a and b: mean 0.65, sample std 0.0707
    assert "replay †" in out and "upper_bound ‡" in out and "sequential †" not in out
    assert "† replay: revisits" in out and "‡ upper bound: static" in out  # the caption says what they are
    assert "federation.lr: 0.002 → 0.05" in out
    assert "pool K" not in out  # no arm keeps a pool


def test_tables_fit_80_columns_and_split_wide_sets_of_arms(tmp_path):
    import io

    from rich.console import Console

    from simlab.compare import comparison_tables

    names = ["sequential-fedavg", "replay-fedavg", "sequential-ida", "replay-ida", "odex-fedavg"]
    runs = [load_run(make_run(tmp_path / f"s{s}", {n: with_hd95({**GOOD, "acc": 0.6 + 0.01 * s}) for n in names},
                              seed=s, pool={"odex-fedavg": [1, 2]})) for s in range(3)]
    tables = comparison_tables(group_runs(runs))
    assert len(tables) > 1  # five arms of "mean ± std (n)" cells do not fit in one
    console = Console(file=io.StringIO(), width=200)  # as wide as a pipe may be: the tables stay within 80
    for t in tables:
        console.print(t)
    lines = console.file.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80
    text = "\n".join(lines)
    assert all(n in text for n in names) and text.count("ACC ↑") == len(tables) and "pool K" in text
    assert "0.610 ± 0.010 (3)" in text and "(1/" in text


def test_the_baseline_check_table_fits_80_columns(tmp_path):
    import io

    from rich.console import Console

    from simlab.baseline import check_table

    arms = {n: with_hd95(GOOD) for n in ("sequential-fedavg", "replay-fedavg", "sequential-ida", "replay-ida")}
    ref = make_run(tmp_path / "ref", arms, pool={"replay-ida": [1, 2]})
    base = tmp_path / "b.yaml"
    run_compare([str(ref)], write_baseline=str(base))
    result = check_against_baseline(group_runs([load_run(ref)])[0], read_baseline(base))
    console = Console(file=io.StringIO(), width=200)
    console.print(check_table(result, base.name))
    lines = console.file.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80
    assert any(" chaudhry_forgetting " in line and "abs:0.03" in line for line in lines)


def test_summary_from_before_the_headline_forgetting(tmp_path):
    old = {"acc": 0.7, "bwt": -0.1, "fwt": 0.05, "forgetting": 0.2, "bytes_total": 1, "wall_time_s": 1.0}
    run = load_run(make_run(tmp_path / "old", {"sequential": old}))
    values = run.arms["sequential"]
    assert values["gem_fwt"] == 0.05 and values["chaudhry_forgetting"] == 0.2  # what they meant then
    assert "fwt" not in values and "forgetting" not in values
    new = load_run(make_run(tmp_path / "new", {"sequential": GOOD}, seed=1))
    with pytest.raises(CompareError, match="metric fwt: absent from"):
        group_runs([run, new])


def test_pool_size_is_the_last_logged_value(tmp_path):
    run = load_run(make_run(tmp_path / "p", {"odex": GOOD, "sequential": GOOD}, pool={"odex": [1, 1, 2, 3]}))
    assert run.arms["odex"]["pool_size"] == 3.0
    assert "pool_size" not in run.arms["sequential"]


# -------------------------------------------------------------------------------- baselines
def test_write_baseline_then_unchanged_passes(tmp_path, capsys):
    runs = [make_run(tmp_path / f"s{s}", {"sequential": {**GOOD, "acc": 0.60 + 0.05 * s}, "replay": GOOD}, seed=s)
            for s in range(2)]
    base = tmp_path / "baselines" / "synth.yaml"
    rc, out = compare(capsys, *map(str, runs), "--write-baseline", str(base), "--tolerance", "wall_time_s=rel:3")
    assert rc == 0 and "baseline written" in out
    text = base.read_text()
    assert text.startswith("# simlab regression baseline. Written by `simlab compare --write-baseline`")
    assert "--tolerance wall_time_s=rel:3" in text.splitlines()[2]
    doc = yaml.safe_load(text)
    entry = doc["arms"]["sequential"]["acc"]
    assert entry == {"mean": 0.625, "std": pytest.approx(np.std([0.60, 0.65], ddof=1), abs=1e-6), "n": 2,
                     "direction": "higher", "tolerance": "abs:0.02"}
    assert doc["arms"]["replay"]["wall_time_s"]["tolerance"] == "rel:3"
    assert doc["arms"]["replay"]["forgetting"]["direction"] == "lower"
    assert doc["scenario"] == "synth" and doc["seeds"] == [0, 1] and doc["runs"] == 2
    rc, out = compare(capsys, *map(str, runs), "--baseline", str(base))
    assert rc == 0 and "no regression" in out and "REGRESSED" not in out
    # JSON works the same way
    jbase = tmp_path / "synth.json"
    assert compare(capsys, *map(str, runs), "--write-baseline", str(jbase))[0] == 0
    jdoc = json.loads(jbase.read_text())
    assert jdoc["comment"][0].startswith("simlab regression baseline") and jdoc["arms"] == {
        arm: {k: {**v, "tolerance": ("rel:1" if k == "wall_time_s" else v["tolerance"])} for k, v in m.items()}
        for arm, m in doc["arms"].items()}
    assert compare(capsys, *map(str, runs), "--baseline", str(jbase))[0] == 0


def test_planted_regressions_named_and_good_changes_pass(tmp_path, capsys):
    base_run = make_run(tmp_path / "base", {"sequential": GOOD, "replay": GOOD})
    base = tmp_path / "b.yaml"
    assert compare(capsys, str(base_run), "--write-baseline", str(base))[0] == 0
    worse = {**GOOD, "acc": GOOD["acc"] - 0.05,  # worse by more than abs:0.02
             "bwt": GOOD["bwt"] + 0.30, "forgetting": GOOD["forgetting"] - 0.10,  # better: never fail
             "wall_time_s": GOOD["wall_time_s"] * 2.5}  # worse by more than rel:1.0
    new = make_run(tmp_path / "new", {"sequential": worse, "replay": {**GOOD, "bytes_total": 3_000_000}})
    rc, out = compare(capsys, str(new), "--baseline", str(base))
    assert rc == 1
    regressed = [line for line in out.splitlines() if "REGRESSED arm" in line]
    assert len(regressed) == 2
    assert any("arm sequential: acc 0.65" in line for line in regressed)
    assert any("arm sequential: wall_time_s 75" in line for line in regressed)
    assert "bwt" not in "".join(regressed) and "forgetting" not in "".join(regressed) and "replay" not in "".join(regressed)
    # explicit tolerances on the command line win over the baseline's
    rc, out = compare(capsys, str(new), "--baseline", str(base), "--tolerance", "acc=abs:0.06",
                      "--tolerance", "wall_time_s=rel:2")
    assert rc == 0, out
    rc, out = compare(capsys, str(new), "--baseline", str(base), "--tolerance", "acc=rel:0.05")
    assert rc == 1 and "acc" in out  # 5 % of 0.70 = 0.035 < 0.05


def test_pool_size_either_direction_against_baseline(tmp_path, capsys):
    base = tmp_path / "b.yaml"
    ref = make_run(tmp_path / "ref", {"odex": GOOD}, pool={"odex": [1, 2, 2, 3]})
    assert compare(capsys, str(ref), "--write-baseline", str(base))[0] == 0
    assert yaml.safe_load(base.read_text())["arms"]["odex"]["pool_size"]["mean"] == 3.0
    for sizes, rc_expected in [([1, 2, 3, 3], 0), ([1, 2, 3, 4], 1), ([1, 1, 1, 2], 1)]:
        run = make_run(tmp_path / f"r{sizes[-1]}{sizes[1]}", {"odex": GOOD}, pool={"odex": sizes})
        rc, out = compare(capsys, str(run), "--baseline", str(base))
        assert rc == rc_expected, out
        if rc == 1:
            assert "arm odex: pool_size" in out
    lost = make_run(tmp_path / "nopool", {"odex": GOOD})
    rc, out = compare(capsys, str(lost), "--baseline", str(base))
    assert rc == 2 and "metric 'pool_size' is in the baseline but not in the runs" in out


def test_mismatches_are_errors_not_passes(tmp_path, capsys):
    ref = make_run(tmp_path / "ref", {"sequential": GOOD, "replay": GOOD})
    base = tmp_path / "b.yaml"
    assert compare(capsys, str(ref), "--write-baseline", str(base))[0] == 0
    fewer = make_run(tmp_path / "fewer", {"sequential": GOOD})
    rc, out = compare(capsys, str(fewer), "--baseline", str(base))
    assert rc == 2 and "arm 'replay' is in the baseline but not in the runs" in out
    more = make_run(tmp_path / "more", {"sequential": GOOD, "replay": GOOD, "ewc": GOOD})
    rc, out = compare(capsys, str(more), "--baseline", str(base))
    assert rc == 2 and "arm 'ewc' is in the runs but not in the baseline" in out
    other = make_run(tmp_path / "other", {"sequential": GOOD, "replay": GOOD}, name="quickstart")
    rc, out = compare(capsys, str(other), "--baseline", str(base))
    assert rc == 2 and "scenario 'synth', but the runs are of 'quickstart'" in out
    undefined = make_run(tmp_path / "undef", {"sequential": {**GOOD, "bwt": None}, "replay": GOOD})
    rc, out = compare(capsys, str(undefined), "--baseline", str(base))
    assert rc == 2 and "metric 'bwt' is undefined (null) in the runs only" in out
    two = make_run(tmp_path / "lr", {"sequential": GOOD, "replay": GOOD}, lr=0.5)
    rc, out = compare(capsys, str(ref), str(two), "--baseline", str(base))
    assert rc == 2 and "the runs span 2" in out
    # settings changed but same scenario and arms: checked, with a warning
    rc, out = compare(capsys, str(two), "--baseline", str(base))
    assert rc == 0 and "warning: the runs' settings differ" in out


def test_undefined_in_both_is_fine(tmp_path, capsys):
    one_stage = {**GOOD, "bwt": None, "fwt": None, "gem_fwt": None, "forgetting": None, "chaudhry_forgetting": None}
    ref = make_run(tmp_path / "ref", {"sequential": one_stage})
    base = tmp_path / "b.yaml"
    assert compare(capsys, str(ref), "--write-baseline", str(base))[0] == 0
    doc = read_baseline(base)
    assert doc["arms"]["sequential"]["bwt"]["mean"] is None
    group = group_runs([load_run(ref)])[0]
    verdicts = {r.metric: r.verdict for r in check_against_baseline(group, doc).rows}
    assert verdicts["bwt"] == "undefined" and verdicts["acc"] == "ok"


def test_bad_inputs(tmp_path, capsys):
    ref = make_run(tmp_path / "ref", {"sequential": GOOD})
    base = tmp_path / "b.yaml"
    assert compare(capsys, str(ref), "--write-baseline", str(base))[0] == 0
    doc = yaml.safe_load(base.read_text())
    doc["arms"]["sequential"]["acc"]["tolerance"] = "about 0.02"
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(doc))
    rc, out = compare(capsys, str(ref), "--baseline", str(broken))
    assert rc == 2 and "arms.sequential.acc.tolerance: expected 'abs:X' or 'rel:X'" in out
    doc["arms"]["sequential"]["acc"]["tolerance"] = "abs:0.02"
    doc["arms"]["sequential"]["forgetting"]["direction"] = "higher"
    broken.write_text(yaml.safe_dump(doc))
    rc, out = compare(capsys, str(ref), "--baseline", str(broken))
    assert rc == 2 and "arms.sequential.forgetting.direction: forgetting is lower-is-better" in out
    rc, out = compare(capsys, str(ref), "--baseline", str(tmp_path / "absent.yaml"))
    assert rc == 2 and "baseline file not found" in out
    failed = tmp_path / "failed"
    failed.mkdir()
    (failed / "FAILED").write_text("RuntimeError: boom\n")
    rc, out = compare(capsys, str(failed))
    assert rc == 2 and "the run failed: RuntimeError: boom" in out
    rc, out = compare(capsys, str(ref), "--tolerance", "acc=0.02")
    assert rc == 2 and "expected 'abs:X' or 'rel:X'" in out
    with pytest.raises(SystemExit):  # --baseline and --write-baseline exclude each other
        compare(capsys, str(ref), "--baseline", str(base), "--write-baseline", str(base))
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("run")
    assert dispatch(parser.parse_args(["run"])) is None  # not one of ours


# ------------------------------------------------------------------- registered metrics (HD95)
def with_hd95(values: dict, hd95: float | None = 4.0, missed: float | None = 0.1) -> dict:
    return {**values, "metrics": {"dice": {"mean": values["acc"]}, "hd95": {"mean": hd95, "missed": missed}}}


def test_hd95_from_the_registry_in_the_table_lower_is_better(tmp_path, capsys):
    assert SPECS["hd95"].direction == REGISTRY["hd95"].direction == "lower"
    assert SPECS["hd95_missed"].direction == "lower"
    assert [m.key for m in METRICS].index("hd95") == 6  # after the headline Dice metrics
    a = make_run(tmp_path / "a", {"sequential": with_hd95(GOOD, 4.0, 0.1), "replay": with_hd95(GOOD, 3.0, 0.05)})
    b = make_run(tmp_path / "b", {"sequential": with_hd95(GOOD, 5.0, 0.2), "replay": with_hd95(GOOD, 3.0, 0.05)}, seed=1)
    run = load_run(a)
    assert run.arms["sequential"]["hd95"] == 4.0 and run.arms["sequential"]["hd95_missed"] == 0.1
    rc, out = compare(capsys, str(a), str(b))
    assert rc == 0
    assert "HD95 ↓" in out and "HD95 missed ↓" in out
    assert "4.50 ± 0.71 (2)" in out and "0.150 ± 0.071 (2)" in out
    old = make_run(tmp_path / "old", {"sequential": GOOD, "replay": GOOD}, seed=2)  # from before the registry
    assert "hd95" not in load_run(old).arms["sequential"]
    mixed = group_runs([load_run(a), load_run(b), load_run(old)])[0]
    assert "hd95" not in mixed.stats["sequential"] and mixed.stats["sequential"]["acc"].n == 3


def test_hd95_regressions_against_a_baseline(tmp_path, capsys):
    ref = make_run(tmp_path / "ref", {"sequential": with_hd95(GOOD, 4.0, 0.1)})
    base = tmp_path / "b.yaml"
    assert compare(capsys, str(ref), "--write-baseline", str(base))[0] == 0
    doc = yaml.safe_load(base.read_text())
    assert doc["arms"]["sequential"]["hd95"] == {"mean": 4.0, "std": 0.0, "n": 1, "direction": "lower",
                                                 "tolerance": "rel:0.25"}
    assert doc["arms"]["sequential"]["hd95_missed"]["tolerance"] == "abs:0.05"
    better = make_run(tmp_path / "better", {"sequential": with_hd95(GOOD, 2.0, 0.0)})
    rc, out = compare(capsys, str(better), "--baseline", str(base))
    assert rc == 0, out
    group = group_runs([load_run(better)])[0]
    verdicts = {r.metric: r.verdict for r in check_against_baseline(group, read_baseline(base)).rows}
    assert verdicts["hd95"] == "better" and verdicts["hd95_missed"] == "better"
    worse = make_run(tmp_path / "worse", {"sequential": with_hd95(GOOD, 5.5, 0.2)})  # allowed: +1.0, +0.05
    rc, out = compare(capsys, str(worse), "--baseline", str(base))
    assert rc == 1
    regressed = [line for line in out.splitlines() if "REGRESSED arm" in line]
    assert any("hd95 5.5 > 4 + 1" in line for line in regressed)
    assert any("hd95_missed 0.2 > 0.1 + 0.05" in line for line in regressed) and len(regressed) == 2


def test_a_metric_absent_from_the_baseline_is_not_checked(tmp_path, capsys):
    ref = make_run(tmp_path / "ref", {"sequential": GOOD})
    base = tmp_path / "b.yaml"
    assert compare(capsys, str(ref), "--write-baseline", str(base))[0] == 0
    new = make_run(tmp_path / "new", {"sequential": with_hd95(GOOD, 99.0, 1.0)})
    rc, out = compare(capsys, str(new), "--baseline", str(base))
    assert rc == 0 and "no regression" in out, out
    # the committed regression baseline reads and checks every key it holds, HD95 included
    committed = Path(__file__).resolve().parent / "regression" / "baselines" / "forgetting.yaml"
    doc = read_baseline(committed)
    arms = {arm: with_hd95({k: e["mean"] for k, e in m.items()}, m["hd95"]["mean"], m["hd95_missed"]["mean"])
            | {"forgetting_by_domain": {}} for arm, m in doc["arms"].items()}
    run = make_run(tmp_path / "forgetting", arms, name=doc["scenario"])
    result = check_against_baseline(group_runs([load_run(run)])[0], doc)
    assert not result.regressions and {r.metric for r in result.rows} == {*SUMMARY_KEYS, "hd95", "hd95_missed"}


# ------------------------------------------------------------------- planted regression, for real
TINY = """\
name: tiny-compare
seed: 2
data: {{image_size: 32, cache_dir: {cache}}}
domains:
  A: {{}}
  B: {{scanner: {{contrast: inverted, noise: 0.02}}}}
hospitals:
  - {{id: h1, size: 8, drift: {{type: abrupt, domains: [A, B], at: [3]}}}}
  - {{id: h2, size: 8, drift: {{type: none, domain: A}}}}
model: {{channels: [8, 16, 32]}}
federation: {{rounds: 4, local_steps: 3, batch_size: 4, lr: 0.01}}
evaluation: {{every: 2, test_size: 6}}
engine: {{device: cpu}}
"""


@pytest.mark.flower
def test_planted_learning_rate_regression_through_flower(tmp_path, capsys):
    from simlab.cli import main

    scenario = tmp_path / "tiny.yaml"
    scenario.write_text(TINY.format(cache=tmp_path / "cache"))
    good, bad = tmp_path / "good", tmp_path / "bad"
    assert main(["run", str(scenario), "--out", str(good), "--quiet"]) == 0
    assert main(["run", str(scenario), "--out", str(bad), "--quiet", "--set", "federation.lr=0.000001"]) == 0
    capsys.readouterr()
    base = tmp_path / "tiny-baseline.yaml"
    assert run_compare([str(good)], write_baseline=str(base), tolerances=["wall_time_s=rel:5"]) == 0
    assert run_compare([str(good)], baseline=str(base)) == 0
    capsys.readouterr()
    rc = run_compare([str(bad)], baseline=str(base))
    out = capsys.readouterr().out
    assert rc == 1
    good_acc = json.loads((good / "summary.json").read_text())["arms"]["sequential"]["acc"]
    bad_acc = json.loads((bad / "summary.json").read_text())["arms"]["sequential"]["acc"]
    assert good_acc - bad_acc > 0.02 and math.isfinite(bad_acc)
    assert f"REGRESSED arm sequential: acc {bad_acc:.6g}" in out
    assert "settings differ from those that produced the baseline" in out  # lr changed: said so
